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


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config (paths excluded: they do not change results)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("paths", None)
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
