"""What a run's result files carry: package versions and the config hash, and when a run counts as complete.

A finished run stands for a config only while everything its numbers depend on is as it
was: the config (:func:`config_hash`), the meaning of the recorded numbers
(:data:`RESULTS_SCHEMA`), the data it read (where it is and a fingerprint of its files,
:mod:`bnn_adapt.training.data_fingerprint`) and, for an adaptation, the base checkpoint's
bytes. :func:`result_problem` says which of them moved.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bnn_adapt.files import file_sha256, read_json, read_json_or_none, write_json  # noqa: F401 - re-exported
from bnn_adapt.training.data_fingerprint import data_identity, newest_change

#: what the numbers of a ``metrics.json`` mean. Bump it when a recorded metric changes its meaning
#: (measured on another split, counted another way): every run written before then runs again.
#: Files without the field were written under schema 1.
RESULTS_SCHEMA = 1

PACKAGES = ("bnn_adapt", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "scikit-learn")


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


#: keys that do not change what a run computes (``table``: a table sweep's own description;
#: ``protocol``: the name of a protocol, whose settings are ``base.*`` keys, hashed; ``threads``:
#: torch's thread count changes only the order of float sums, so a run at another count is the
#: same experiment and is not repeated; each run records the count it used, README: reproducibility;
#: ``search``: which trial of a search a run is and how the search judges it, bnn_adapt.search.study).
#: Where the data is, is not a key's business either: :func:`result_problem` compares the data itself.
NOT_HASHED = ("paths", "resume", "debug", "table", "protocol", "threads", "search")
#: ``logger`` entries that only mirror what a run computes (bnn_adapt.run.tracking): not hashed either
TRACKERS = ("tensorboard", "wandb", "mlflow")

#: options added since 0.1, at the value that computes what runs before them computed:
#: left out of the hash at that value, so those runs still count as complete
ADDED_SINCE_V1: dict[str, object] = {
    "predict.packed": True,
    "base.epoch": "last",
    # weights below 32 bits (issue #13); hashed unresolved, so the strategy's own key is the interpolation
    "adapter.bits": 32,
    "adapter.model.bits": "${adapter.bits}",
    # issue #24: where small images live changes no result; issue #23: no validation split = the thesis's protocol
    "data.on_device": "auto",
    "data.val_fraction": 0.0,
    "trainer.sync_batchnorm": False,  # trainer=ddp's own key since issue #21 (Lightning's default)
    "trainer.compile": False,  # torch.compile (issue #24)
    "trainer.channels_last": False,
    # precise BN (issue #22) off: what every base computed before it (on by default for the STE base)
    "base.precise_bn": {"enabled": False, "batches": 100, "every_epoch": False},
    # ... and at the end of an adaptation, for the BNs it trains (issue #22): what adaptations computed before
    "base.precise_bn.adaptation": False,
}
#: of those, the keys only an adaptation reads: neutral at any value in the other tasks (a pretraining
#: run's hash does not move with them)
ADAPTATION_ONLY = ("base.precise_bn.adaptation",)

#: ``_target_``s as 0.1 spelled them, before the package was split into subpackages
V1_TARGETS = {
    "bnn_adapt.adapters.HeadOnly": "bnn_adapt.strategies.HeadOnly",
    "bnn_adapt.adapters.FullFinetune": "bnn_adapt.strategies.FullFinetune",
    "bnn_adapt.adapters.Serial": "bnn_adapt.strategies.Serial",
    "bnn_adapt.adapters.Parallel": "bnn_adapt.strategies.Parallel",
    "bnn_adapt.adapters.LoRA": "bnn_adapt.strategies.LoRA",
    "bnn_adapt.adapters.BitFit": "bnn_adapt.strategies.BitFit",
    "bnn_adapt.training.datamodule.ClassSplitDataModule": "bnn_adapt.data.ClassSplitDataModule",
}
TAP_CACHE_ADAPTERS = ("head_only", "udta")  # the adapter configs that held the tap-cache keys in 0.1


def v1_spelling(data: dict) -> dict:
    """The config as 0.1 spelled it, from today's (a container, modified in place).

    0.2 moved keys between groups (``trainer.memory`` -> ``memory``, the
    tap-cache keys -> ``tap_cache``, ``reduction.groups`` -> ``adapter.groups``)
    and modules (``_target_``s); hashing the old spelling keeps the hashes of
    runs written before, so they are not run again.
    """
    adapter, reduction = data.get("adapter") or {}, data.get("reduction")
    if "trainer" in data:
        data["trainer"]["memory"] = data.pop("memory", "standard")
    tap_cache = data.pop("tap_cache", None) or {}
    if "data" in data:
        data["data"]["cached_views"] = tap_cache.get("views", 1)
        if "num_workers" in data["data"] and data["data"]["num_workers"] is None:
            data["data"]["num_workers"] = 0  # null (chosen per device, issue #24) is 0.1's 0 on the CPU
    if adapter.get("name") in TAP_CACHE_ADAPTERS:
        adapter["cache_taps"] = tap_cache.get("enabled", False)
        adapter["cache_max_gb"] = tap_cache.get("max_gb")
    groups = adapter.pop("groups", None)  # None: ungrouped
    if isinstance(adapter.get("model"), dict) and "groups" in adapter["model"]:
        adapter["model"]["groups"] = "${reduction.groups}"
    if reduction is not None:
        reduction["groups"] = 1 if groups is None else groups
        if reduction.get("name") == "none" and groups is not None:
            reduction["name"] = "groups"  # 0.1 grouped the 1x1 convs through reduction=groups
    return _v1_targets(data)


def _v1_targets(node):
    if isinstance(node, dict):
        return {k: V1_TARGETS.get(v, v) if k == "_target_" else _v1_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_v1_targets(v) for v in node]
    return node


def _drop_neutral(data: dict) -> None:
    for key, neutral in ADDED_SINCE_V1.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not (isinstance(node, dict) and leaf in node):
            continue
        unread = key in ADAPTATION_ONLY and data.get("task") != "adapt"
        if unread or node[leaf] == neutral or _switched_off(node[leaf], neutral):
            del node[leaf]


def _switched_off(value, neutral) -> bool:
    """An option block whose neutral state is ``enabled: false`` is neutral whatever else it sets
    (the smoke profile's ``base.precise_bn.batches`` does not matter while precise BN is off)."""
    return (
        isinstance(value, dict)
        and isinstance(neutral, dict)
        and neutral.get("enabled") is False
        and value.get("enabled") is False
    )


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the config, without keys that do not change results.

    Hashed unresolved, so the many values interpolated from ``paths.*`` (log
    and checkpoint folders) do not make two identical runs look different;
    without experiment trackers, which only mirror what a run logs;
    in 0.1's spelling, without options added since at their neutral value,
    so runs written before still count (``tests/data/config_hashes.json``).
    """
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in NOT_HASHED:
        data.pop(key, None)
    if isinstance(data.get("logger"), dict):
        data["logger"] = {k: v for k, v in data["logger"].items() if k not in TRACKERS}
    _drop_neutral(data)
    data = v1_spelling(data)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_identity(cfg: DictConfig) -> dict:
    """Where the configured dataset is read from and a fingerprint of its files (recorded as ``data``)."""
    return data_identity(cfg.data.name, cfg.data.root)


def result_problem(metrics: dict, run_dir: str | Path, cfg: DictConfig, cfg_hash: str | None = None) -> str | None:
    """Why the results a run recorded (``metrics``) no longer stand for ``cfg``, or None when they do.

    A run written before the data was recorded (no ``data`` field) still stands when its
    resolved ``data.root`` is today's and no file of the dataset changed after it wrote its
    ``metrics.json``.
    """
    if metrics.get("config_hash") != (cfg_hash or config_hash(cfg)):
        return "its config differs"
    schema = metrics.get("results_schema", 1)
    if schema != RESULTS_SCHEMA:
        return f"it recorded results schema {schema}, and this code writes schema {RESULTS_SCHEMA}"
    recorded, now = metrics.get("data"), dataset_identity(cfg)
    if recorded is not None:
        if recorded.get("location") != now["location"]:
            return f"it read the data at {recorded.get('location')}, this config reads {now['location']}"
        if recorded.get("fingerprint") != now["fingerprint"]:
            return f"the files under {now['location']} changed since it ran ({recorded.get('files')} -> {now['files']} files)"
        return None
    then = ((metrics.get("config") or {}).get("data") or {}).get("root")
    if then != cfg.data.root:
        return f"it read the data at {then}, this config reads {cfg.data.root}"
    newest, written = newest_change(cfg.data.name, cfg.data.root), Path(run_dir, "metrics.json").stat().st_mtime
    if newest is not None and newest > written:
        return f"a file under {now['location']} changed after it ran"
    return None


def completed_metrics(run_dir: str | Path, cfg: DictConfig, base_sha256: str | None = None) -> dict | None:
    """The run's metrics if it finished with this exact config and data (:func:`result_problem`), else None.

    An adaptation run also records the SHA-256 of the base checkpoint it
    adapted (``base_checkpoint_sha256``): when the file at that path has since
    changed (a base retrained in place) or gone, the run no longer counts.
    """
    metrics = read_json_or_none(Path(run_dir) / "metrics.json")
    if not (
        metrics and metrics.get("status", "complete") == "complete" and result_problem(metrics, run_dir, cfg) is None
    ):
        return None
    recorded = metrics.get("base_checkpoint_sha256")
    return metrics if recorded is None or recorded == base_sha256 else None
