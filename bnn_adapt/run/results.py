"""What a run's record carries besides its numbers: the config hash, package versions and the data's identity.

A finished run stands for a config only while its config (:func:`config_hash`), the data it
read and, for an adaptation, the base checkpoint's bytes are as they were
(:func:`bnn_adapt.run.record.result_problem`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version

from omegaconf import DictConfig, OmegaConf

from bnn_adapt.files import file_sha256, read_json, read_json_or_none, write_json  # noqa: F401 - re-exported
from bnn_adapt.training.data_fingerprint import data_identity

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
#: ``export``, ``predict``, ``evaluate``: read only by those tasks, which are never skipped as complete.
NOT_HASHED = ("paths", "resume", "debug", "table", "protocol", "threads", "search", "export", "predict", "evaluate")
#: ``logger`` entries that only mirror what a run computes (bnn_adapt.run.tracking): not hashed either
TRACKERS = ("tensorboard", "wandb", "mlflow")

#: the hash's own version: part of every hash, raised when what a config computes changes
#: without its keys changing (then every run reruns once), and with the keys' spelling when it
#: changes (every run written before reruns: the CHANGELOG says so)
HASH_VERSION = 2


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the config, without keys that do not change results.

    Hashed unresolved, so the many values interpolated from ``paths.*`` (log
    and checkpoint folders) do not make two identical runs look different;
    without experiment trackers, which only mirror what a run logs; with
    :data:`HASH_VERSION` (``tests/data/config_hashes.json`` holds recorded hashes).
    """
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in NOT_HASHED:
        data.pop(key, None)
    if isinstance(data.get("logger"), dict):
        data["logger"] = {k: v for k, v in data["logger"].items() if k not in TRACKERS}
    data["hash_version"] = HASH_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_identity(cfg: DictConfig) -> dict:
    """Where the configured dataset is read from and a fingerprint of its files (recorded as ``data``)."""
    return data_identity(cfg.data.name, cfg.data.root)
