"""Base checkpoints: a pretrained base with the architecture it was built with.

A checkpoint records ``arch`` and the constructor arguments (``arch_config``:
block, width, classes) and the image size it was trained at; adaptation
refuses a checkpoint of another architecture rather than loading it silently.
ReActNet-18 also loads from the authors' own format
(:mod:`bnn_adapt.bases.reactnet_checkpoint`).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.reactnet_checkpoint import load_reactnet_checkpoint
from bnn_adapt.bases.registry import BASES
from bnn_adapt.errors import CheckpointError, ConfigError, UserError, printable
from bnn_adapt.files import atomic_output

#: what a checkpoint written before a constructor argument existed was built with
LEGACY_ARCH_DEFAULTS = {"ste_resnet_cifar": {"block": "binarynet"}}


#: the config key behind each recorded architecture value
CONFIG_KEYS = {"block": "base.block={}", "width": "base.width={}", "image_size": "data.image_size={}"}


def rebuild(arch: str, arch_config: dict) -> BaseNetwork:
    """A fresh ``arch`` from the constructor arguments a checkpoint or packed file recorded."""
    return BASES[arch](**{**LEGACY_ARCH_DEFAULTS.get(arch, {}), **arch_config})


#: the range a received file may declare for each architecture argument: larger networks than these are no
#: base anyone trains, and checking before building keeps an edited number from allocating gigabytes
ARCH_LIMITS = {"num_classes": (1, 100_000), "width": (0.01, 4.0), "blocks_per_stage": (1, 8), "depth": (8, 110)}


def checked_arch(arch: object, arch_config: object, source: str, error: type[UserError] = CheckpointError) -> dict:
    """A received file's architecture, checked before anything is built: a known ``arch`` and a dict of
    that constructor's own arguments, each a plain value of the default's type within :data:`ARCH_LIMITS`.
    Returns the full constructor arguments (defaults of older files filled in)."""
    if not isinstance(arch, str) or arch not in BASES:
        raise error(f"{source} declares the architecture {printable(repr(arch))[:80]}, which this version does "
                    f"not know (known: {', '.join(BASES)})")  # fmt: skip
    if not isinstance(arch_config, dict):
        raise error(f"{source} declares no architecture arguments (arch_config is {type(arch_config).__name__}, "
                    "not a dict)")  # fmt: skip
    params = {k: p for k, p in inspect.signature(BASES[arch].__init__).parameters.items() if k != "self"}
    unknown = sorted(map(str, set(arch_config) - set(params)))
    if unknown:
        raise error(f"{source} declares {printable(', '.join(unknown))[:120]} for {arch}, whose arguments are "
                    f"{', '.join(params)}")  # fmt: skip
    for key, value in arch_config.items():
        default = params[key].default
        kind, word = {float: ((int, float), "a number"), int: (int, "an integer")}.get(type(default), (str, "a string"))
        if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
            raise error(f"{source} declares {arch} {key}={printable(repr(value))[:80]}, not {word}")
        low, high = ARCH_LIMITS.get(key, (None, None))
        if low is not None and not low <= value <= high:
            raise error(f"{source} declares {arch} {key}={value}, outside {low}..{high}")
    config = {**LEGACY_ARCH_DEFAULTS.get(arch, {}), **arch_config}
    try:
        expected_shapes(arch, config)
    except (ConfigError, ValueError, TypeError, RuntimeError) as exc:
        raise error(f"{source} declares an architecture that cannot be built: {exc}") from None
    return config


def expected_shapes(arch: str, arch_config: dict) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``arch`` with ``arch_config``, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        net = rebuild(arch, arch_config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def best_epoch_path(path: str | Path) -> Path:
    """Where pretraining keeps its best-test-accuracy epoch, beside ``path`` (its last): ``<stem>_best<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_best{path.suffix}")


def describe(arch: str, config: dict) -> str:
    return f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})"


def save_base(base: BaseNetwork, path: str | Path, **meta) -> None:
    """Store a pretrained base with what is needed to rebuild it."""
    payload = {"arch": base.arch, "arch_config": base.arch_config(), "state_dict": base.state_dict(), **meta}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_base(arch: str, path: str | Path, how_to_get: str, expected: dict | None = None, **arch_config) -> BaseNetwork:
    """Rebuild ``arch`` from ``path``; ReActNet also reads the authors' format.

    ``expected``: the architecture the caller configured (constructor arguments,
    plus ``image_size``); a checkpoint built otherwise is refused, so that a base
    of another block, width or input size never loads silently.
    """
    path = Path(path)
    if arch == "reactnet18":
        return load_reactnet_checkpoint(path, **arch_config)
    if not path.is_file():
        raise CheckpointError(f"base checkpoint {path} does not exist; {how_to_get}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"base checkpoint {path} is unreadable ({exc}); {how_to_get}") from None
    if not isinstance(payload, dict) or payload.get("arch") != arch:
        found = payload.get("arch") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"base checkpoint {path} holds a {found!r} network, not {arch!r}; "
            f"pick the matching base=... or another base.checkpoint"
        )
    stored = {**LEGACY_ARCH_DEFAULTS.get(arch, {}), **payload["arch_config"]}
    trained_on = {**stored, "image_size": payload.get("image_size")}
    differs = [k for k, v in (expected or {}).items() if trained_on.get(k) is not None and trained_on[k] != v]
    if differs:
        fixes = " and ".join(CONFIG_KEYS.get(k, k + "={}").format(trained_on[k]) for k in differs)
        raise CheckpointError(
            f"base checkpoint {path} holds {describe(arch, {k: trained_on[k] for k in expected})}, but the config "
            f"asks for {describe(arch, expected)}; set {fixes}, or pretrain a base for this config ({how_to_get})"
        )
    base = rebuild(arch, stored)
    base.load_state_dict(payload["state_dict"])
    return base
