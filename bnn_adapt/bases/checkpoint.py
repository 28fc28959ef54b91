"""Base checkpoints: a pretrained base with the architecture it was built with.

A checkpoint records ``arch`` and the constructor arguments (``arch_config``:
block, width, classes) and the image size it was trained at; adaptation
refuses a checkpoint of another architecture rather than loading it silently.
A base whose authors released its weights reads their format instead
(:attr:`BaseNetwork.load_released`).
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import torch

from bnn_adapt.bases.base import BASES, BaseNetwork, rebuild
from bnn_adapt.bases.received import check_state, checked_arch, expected_shapes, few
from bnn_adapt.errors import CheckpointError, printable
from bnn_adapt.files import atomic_output, load_weights

#: the config key behind each recorded architecture value
CONFIG_KEYS = {
    "block": "base.block={}",
    "binarize": "base.binarize={}",
    "width": "base.width={}",
    "image_size": "data.image_size={}",
}


def best_epoch_path(path: str | Path) -> Path:
    """Where pretraining keeps its best-test-accuracy epoch, beside ``path`` (its last): ``<stem>_best<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_best{path.suffix}")


def describe(arch: str, config: dict) -> str:
    return f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})"


def save_base(base: BaseNetwork, path: str | Path, **meta) -> None:
    """Store a pretrained base with what is needed to rebuild it."""
    payload = {"arch": base.arch, "arch_config": base.arch_config(), "state_dict": base.state_dict(), **meta}
    buffer = io.BytesIO()  # torch.save's own writer reports a full disk without its errno
    torch.save(payload, buffer)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_base(arch: str, path: str | Path, how_to_get: str, expected: dict | None = None, **arch_config) -> BaseNetwork:
    """Rebuild ``arch`` from ``path``; a released base from its authors' file (``arch_config``: its classes, width).

    ``expected``: the architecture the caller configured (constructor arguments,
    plus ``image_size``); a checkpoint built otherwise is refused, so that a base
    of another block, width or input size never loads silently. The file is read
    as data only, and its architecture and tensors are checked before a network
    is built.
    """
    path = Path(path)
    released = BASES[arch].load_released if arch in BASES else None
    if released is not None:
        base = released(path, **arch_config)
        base.origin = "its authors' release"
        return base
    if not path.is_file():
        raise CheckpointError(f"base checkpoint {path} does not exist; {how_to_get}")
    payload = load_weights(path, "base checkpoint", how_to_get, error=CheckpointError)
    foreign = (
        BASES[arch].load_foreign if arch in BASES and not (isinstance(payload, dict) and "arch" in payload) else None
    )
    base = foreign(payload, str(path)) if foreign is not None else None
    if base is not None:
        refuse_other(path, arch, base.arch_config(), expected, how_to_get)
        return base
    if not isinstance(payload, dict) or payload.get("arch") != arch:
        found = payload.get("arch") if isinstance(payload, dict) else type(payload).__name__
        if isinstance(payload, dict) and "arch" not in payload:
            raise CheckpointError(
                f"base checkpoint {path} records no architecture and is in no format {arch} reads (its keys: "
                f"{few(payload)}); pick the matching base=... or another base.checkpoint"
            )
        raise CheckpointError(
            f"base checkpoint {path} holds a {printable(repr(found))[:80]} network, not {arch!r}; "
            f"pick the matching base=... or another base.checkpoint"
        )
    source = f"base checkpoint {path}"
    stored = checked_arch(arch, payload.get("arch_config"), source)
    image_size = payload.get("image_size")
    if image_size is not None and (type(image_size) is not int or image_size < 1):
        raise CheckpointError(
            f"{source} records the image size {printable(repr(image_size))[:80]}, not a positive integer: the file "
            "is damaged; pretrain the base again"
        )
    unrecorded = sorted(set(inspect.signature(BASES[arch].__init__).parameters) - {"self", *stored})
    if unrecorded:
        raise CheckpointError(
            f"{source} does not record {', '.join(unrecorded)} (an earlier version wrote it): pretrain the base "
            f"again ({how_to_get})"
        )
    refuse_other(path, arch, {**stored, "image_size": image_size}, expected, how_to_get)
    check_state(payload.get("state_dict"), expected_shapes(arch, stored), source, describe(arch, stored))
    base = rebuild(arch, stored)
    base.load_state_dict(payload["state_dict"])
    base.origin = "bnn_adapt"
    return base


def refuse_other(path: Path, arch: str, trained_on: dict, expected: dict | None, how_to_get: str) -> None:
    """A one-line refusal when the checkpoint's architecture (``trained_on``; None: not recorded) is not
    the ``expected`` one the config asks for, naming the settings that would match it."""
    differs = [k for k, v in (expected or {}).items() if trained_on.get(k) is not None and trained_on[k] != v]
    if differs:
        fixes = " and ".join(CONFIG_KEYS.get(k, k + "={}").format(printable(trained_on[k])) for k in differs)
        raise CheckpointError(
            f"base checkpoint {path} holds {printable(describe(arch, {k: trained_on.get(k) for k in expected}))}, "
            f"but the config asks for {describe(arch, expected)}; set {fixes}, or pretrain a base for this config "
            f"({how_to_get})"
        )
