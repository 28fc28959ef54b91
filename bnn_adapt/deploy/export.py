"""``task=export``: deployable files of a base and its trained adapters, sizes measured.

Writes into ``export.dir``:

* ``base.bnnpack``: the base bit-packed (:mod:`bnn_adapt.deploy.packed_base`);
* one ``<run label>.safetensors`` per ``export.adapter_run`` (a finished
  adaptation run's directory, or a sweep directory: each of its finished
  adaptation runs): adapter + head (:mod:`bnn_adapt.adapters.file`);
* ``manifest.json``: ``{"files": {name: {"bytes": on disk, "predicted_bytes":
  n_bin / 8 + 4 * n_fp32, ...}}}`` (the size formula).

The base comes from ``base.checkpoint``, or, when adapter runs are given,
from the runs' own ``base.checkpoint`` (all of them must share it).
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from bnn_adapt import accounting
from bnn_adapt.adapters.file import ADAPTER_FILE, attach_adapter, export_adapter, is_adapter_file
from bnn_adapt.adapters.strategy import substituted
from bnn_adapt.bases.fingerprint import fingerprint
from bnn_adapt.bases.received import checked_arch
from bnn_adapt.deploy.packed_base import write_packed_base
from bnn_adapt.errors import ExportError, FingerprintError, printable
from bnn_adapt.files import read_json, write_json
from bnn_adapt.run import builders
from bnn_adapt.run.labels import run_label
from bnn_adapt.run.record import RecordError, RunRecord

log = logging.getLogger(__name__)

BASE_FILE = "base.bnnpack"


def formula_bytes(n_fp32: int, n_binary: int) -> float:
    """The size metric's memory in bytes: 1 bit per binary, 32 per fp32 parameter (docs/concepts.md, Size)."""
    return n_binary / 8 + 4 * n_fp32


@dataclass
class TrainedRun:
    """A finished adaptation run: its trained model on a base loaded from its ``base.checkpoint``."""

    run_dir: Path
    model: nn.Module
    reference_base: nn.Module  # the base as stored at base.checkpoint, untouched by training
    class_names: list[str]
    preprocess: dict
    label: str
    config_hash: str | None
    base_checkpoint: str | None
    base_overrides: dict = field(default_factory=dict)  # base tensors the run changed (its training, base.bn=adapt)


#: what export reads of a run's recorded config: each key, the types it may have and their name
RECORDED = {
    "base": (dict, "section"),
    "base.name": (str, "string"),
    "base.checkpoint": (str, "string"),
    "base.width": ((int, float), "number"),
    "base.net": (dict, "section"),
    "data": (dict, "section"),
    "data.image_size": (int, "integer"),
    "adapter": (dict, "section"),
    "reduction": (dict, "section"),
}


def interpolation(config: dict) -> str | None:
    """The key of a string in ``config`` that holds an interpolation (``${``), if any."""
    stack: list[tuple[str, object]] = [("", config)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, str) and "${" in value:
            return key
        if isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(f"{key}.{k}".lstrip("."), v) for k, v in items]
    return None


def recorded_config(metrics: RunRecord, where: str) -> DictConfig:
    """The part of the config a run recorded in its ``metrics.json`` that export reads (its base), read as
    data: checked, the base architecture too, and never instantiated. Runs record their config resolved, so
    an interpolation in one was put there by hand: it is refused (resolving it could read the environment)."""
    config = metrics.config
    if not isinstance(config, dict):
        raise ExportError(f"{where} records no config (a dict) but a {type(config).__name__}: the file is damaged")
    for key, (kind, word) in RECORDED.items():
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            found = printable(repr(value))[:80]
            raise ExportError(f"{where} records {key} as {found}, not a {word}: the file is damaged")
    found = interpolation(config)
    if found is not None:
        raise ExportError(
            f"{where} records {printable(found)[:120]} as an interpolation (${{...}}), but runs record their "
            "config resolved: the file was edited, and is refused"
        )
    net = {k: v for k, v in config["base"]["net"].items() if k != "_target_"}
    checked_arch(config["base"]["name"], net, f"{where} (base.net)", error=ExportError)
    try:
        return OmegaConf.create({"base": config["base"], "data": {"image_size": config["data"]["image_size"]}})
    except (OmegaConfBaseException, RecursionError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {printable(exc)[:200]}"
        raise ExportError(f"{where} records a base section OmegaConf cannot read ({problem})") from None


def load_run(run_dir: str | Path) -> TrainedRun:
    """The trained model of a finished adaptation run: its adapter file attached to the base its recorded
    config names. A run folder may come from someone else: whatever is wrong with it is one line."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ExportError(
            f"export.adapter_run={run_dir} holds no metrics.json: give a finished adaptation run's directory"
        )
    where = f"export.adapter_run={run_dir}: its metrics.json"
    try:
        metrics = RunRecord.from_dict(read_json(metrics_path), where)
    except (OSError, ValueError, RecursionError) as exc:
        raise ExportError(f"{where} is unreadable ({type(exc).__name__}: {printable(exc)[:200]})") from None
    except RecordError as exc:
        raise ExportError(printable(exc)[:400]) from None
    if not metrics.complete:
        status, error = printable(metrics.status)[:40], printable(metrics.error or "-")[:200]
        raise ExportError(
            f"export.adapter_run={run_dir} did not finish (status {status}: {error}); export finished runs only"
        )
    if metrics.task != "adapt":
        task = printable(repr(metrics.task))[:40]
        raise ExportError(f"export.adapter_run={run_dir} is a {task} run, not an adaptation run")
    cfg = recorded_config(metrics, where)
    adapter = run_dir / ADAPTER_FILE
    if not is_adapter_file(adapter):
        raise ExportError(
            f"export.adapter_run={run_dir} holds no {ADAPTER_FILE} of this version (every adaptation run writes "
            "one): run the adaptation again with this bnn_adapt"
        )
    try:
        reference = builders.load_trained_base(cfg)
    except OmegaConfBaseException as exc:  # a key the base's config needs is missing
        problem = f"{type(exc).__name__}: {printable(exc)[:200]}"
        raise ExportError(f"{where} records no usable base config ({problem})") from None
    attached = attach_adapter(adapter, copy.deepcopy(reference))
    meta = attached.meta
    return TrainedRun(
        run_dir,
        attached.model,
        reference,
        meta["class_names"],
        meta["preprocess"],
        run_label(metrics.to_dict()),
        metrics.config_hash,
        builders.base_checkpoint_file(cfg),
        base_overrides=attached.base_overrides,
    )


def file_name(label: str, taken: set[str]) -> str:
    """A run's label (``a b=c prune 0.9``) -> ``a_b_c_prune_0.9.safetensors`` (unique in ``taken``)."""
    stem = re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") or "adapter"
    name, i = f"{stem}.safetensors", 2
    while name in taken:
        name, i = f"{stem}_{i}.safetensors", i + 1
    return name


def export_all(base: nn.Module, runs: list[TrainedRun], out: Path, dtype: str, base_meta: dict | None = None) -> dict:
    """Write the packed base and every run's adapter into ``out``; returns the manifest."""
    base_fp32, base_bin = accounting.totals(accounting.parameter_rows(base))
    header = write_packed_base(base, out / BASE_FILE, meta=base_meta)
    files = {
        BASE_FILE: {
            "kind": "base",
            "bytes": (out / BASE_FILE).stat().st_size,
            "predicted_bytes": formula_bytes(base_fp32, base_bin),
            "binary_params": base_bin,
            "fp32_params": base_fp32,
            "arch": header["arch"],
            "fingerprint": header["fingerprint"],
        }
    }
    for run in runs:
        name = file_name(run.label, set(files))
        source = {"run_dir": str(run.run_dir), "config_hash": run.config_hash}
        with substituted(run.model.base, run.base_overrides):  # what the run changed in its base travels along
            meta = export_adapter(
                run.model,
                out / name,
                reference_base=base,
                dtype=dtype,
                class_names=run.class_names,
                preprocess=run.preprocess,
                source=source,
            )
        c = accounting.summarize(run.model)
        files[name] = {
            "kind": "adapter",
            "strategy": meta["strategy"],
            "bytes": (out / name).stat().st_size,
            "predicted_bytes": c["introduced_bits"] / 8,  # every weight at its real width
            "binary_params": c["introduced_binary_params"],
            "fp32_params": c["introduced_fp32_params"],
            "quantized_params": c["introduced_quantized_params"],
            "weight_bits": c["weight_bits"],
            "dtype": dtype,
            "run_dir": str(run.run_dir),
        }
        if dtype != "fp32" and run.model.sign_sensitive:
            log.warning(
                "%s: a %s adapter's output is binarised again downstream, so %s rounding can flip signs "
                "and change predictions; check them (task=predict) or export fp32",
                name,
                meta["strategy"],
                dtype,
            )
    manifest = {"base_fingerprint": header["fingerprint"], "dtype": dtype, "files": files}
    write_json(out / "manifest.json", manifest)
    return manifest


def size_table(manifest: dict) -> str:
    lines = [f"{'file':<48} {'bytes':>12} {'formula':>12} {'ratio':>7}"]
    for name, f in manifest["files"].items():
        ratio = f["bytes"] / f["predicted_bytes"] if f["predicted_bytes"] else float("nan")
        lines.append(f"{name:<48} {f['bytes']:>12,} {round(f['predicted_bytes']):>12,} {ratio:>7.3f}")
    return "\n".join(lines)


def _finished_adaptation(metrics: RunRecord | None) -> bool:
    return metrics is not None and metrics.complete and metrics.task == "adapt"


def adapter_run_dirs(given: list) -> list[Path]:
    """The runs to export: each given run directory, and every finished adaptation run directly inside
    a given sweep directory (a table's, ``outputs/tables/<profile>/table_6_5``, or a search's), in name order."""
    found = []
    for folder in map(Path, given):
        if (folder / "metrics.json").is_file() or not folder.is_dir():
            found.append(folder)  # a run directory (load_run says what is wrong with it, if anything)
            continue
        rows = sorted(path.parent for path in folder.glob("*/metrics.json"))
        usable = [row for row in rows if _finished_adaptation(RunRecord.read(row))]
        if not usable:
            raise ExportError(
                f"export.adapter_run={folder} holds no metrics.json, nor run directories of finished adaptation "
                "runs: give a finished adaptation run's directory or a sweep directory"
            )
        skipped = [row.name for row in rows if row not in usable]
        if skipped:
            print(
                f"note: export.adapter_run={folder}: exporting its {len(usable)} finished adaptation runs; "
                f"not {', '.join(skipped)} (unfinished, failed or not adaptation runs)",
                file=sys.stderr,
            )
        found += usable
    return found


def run_export(cfg: DictConfig) -> dict:
    """``task=export``: see the module docstring."""
    out = Path(cfg.export.dir)
    given = cfg.export.get("adapter_run")
    run_dirs = adapter_run_dirs(list(given) if isinstance(given, (list, ListConfig)) else [given] if given else [])
    runs = [load_run(d) for d in run_dirs]
    if runs:
        base = runs[0].reference_base
        ours = fingerprint(base)
        for run in runs[1:]:
            theirs = fingerprint(run.reference_base)
            if theirs != ours:
                raise FingerprintError(
                    f"export.adapter_run {run.run_dir} was trained on the base with fingerprint {theirs}, "
                    f"{runs[0].run_dir} on {ours}: export runs of one base together"
                )
        checkpoint = runs[0].base_checkpoint
    else:
        base = builders.load_trained_base(cfg)
        checkpoint = builders.base_checkpoint_file(cfg)
    manifest = export_all(base, runs, out, cfg.export.dtype, base_meta={"checkpoint": str(checkpoint)})
    print(size_table(manifest))
    print(f"exported to {out} (manifest.json lists bytes on disk next to the formula's)")
    return {"task": "export", **manifest}
