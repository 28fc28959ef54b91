"""Result files: written atomically, carrying versions and the config hash."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("bnn_adapt", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf")


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


#: keys that do not change what a run computes
NOT_HASHED = ("paths", "resume", "debug")


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the config, without keys that do not change results.

    Hashed unresolved, so the many values interpolated from ``paths.*`` (log
    and checkpoint folders) do not make two identical runs look different.
    """
    data = OmegaConf.to_container(cfg, resolve=False)
    for key in NOT_HASHED:
        data.pop(key, None)
    (data.get("predict") or {}).pop("packed", None)  # how task=predict runs the base, added after runs were hashed
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str | Path, payload: dict) -> Path:
    """Write via a temporary file and rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_json_or_none(path: str | Path) -> dict | None:
    """A result file's content, or None when it is absent or unreadable."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (a base checkpoint), or None when there is none."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def completed_metrics(run_dir: str | Path, cfg_hash: str, base_sha256: str | None = None) -> dict | None:
    """The run's metrics if it finished with this exact config, else None.

    An adaptation run also records the SHA-256 of the base checkpoint it
    adapted (``base_checkpoint_sha256``): when the file at that path has since
    changed (a base retrained in place) or gone, the run no longer counts.
    """
    metrics = read_json_or_none(Path(run_dir) / "metrics.json")
    if not (metrics and metrics.get("status", "complete") == "complete" and metrics.get("config_hash") == cfg_hash):
        return None
    recorded = metrics.get("base_checkpoint_sha256")
    return metrics if recorded is None or recorded == base_sha256 else None
