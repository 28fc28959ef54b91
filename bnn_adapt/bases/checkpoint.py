"""Base checkpoints: a pretrained base with the architecture it was built with.

A checkpoint records ``arch`` and the constructor arguments (``arch_config``:
block, width, classes) and the image size it was trained at; adaptation
refuses a checkpoint of another architecture rather than loading it silently.
ReActNet-18 also loads from the authors' own format
(:mod:`bnn_adapt.bases.reactnet_checkpoint`).
"""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path

import torch

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.registry import BASES
from bnn_adapt.errors import CheckpointError, ConfigError, UserError, printable
from bnn_adapt.files import atomic_output, load_weights, require_finite

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
    buffer = io.BytesIO()  # torch.save's own writer reports a full disk without its errno
    torch.save(payload, buffer)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def few(names) -> str:
    """The first few of ``names`` (read from a file: escaped, each cut short), and how many there are."""
    names = sorted(map(str, names))
    shown = ", ".join(printable(name)[:80] for name in names[:5])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def check_state(state: object, shapes: dict[str, tuple[int, ...]], source: str, what: str) -> None:
    """A received state dict checked against the ``shapes`` its architecture has, before a network is built:
    dense real tensors by name, none missing, none unknown, each of its shape and finite (NaN in a base's
    weights would binarise to +1 and predict confidently)."""
    plain = isinstance(state, dict) and all(
        isinstance(k, str) and torch.is_tensor(v) and v.layout == torch.strided and not v.is_quantized
        and not v.is_complex() for k, v in state.items()
    )
    if not plain:
        raise CheckpointError(f"{source} holds no state_dict of named dense real tensors: it is not a {what}")
    missing, unknown = [k for k in shapes if k not in state], [k for k in state if k not in shapes]
    if missing or unknown:
        parts = [f"{source} does not hold a {what}."]
        parts += [f"Missing keys: {few(missing)}."] if missing else []
        parts += [f"Unexpected keys: {few(unknown)}."] if unknown else []
        raise CheckpointError(" ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in shapes.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"{source} has the shapes of another network than {what}: {few(wrong)}")
    require_finite(state, source, error=CheckpointError)


def load_base(arch: str, path: str | Path, how_to_get: str, expected: dict | None = None, **arch_config) -> BaseNetwork:
    """Rebuild ``arch`` from ``path``; ReActNet also reads the authors' format.

    ``expected``: the architecture the caller configured (constructor arguments,
    plus ``image_size``); a checkpoint built otherwise is refused, so that a base
    of another block, width or input size never loads silently. The file is read
    as data only, and its architecture and tensors are checked before a network
    is built.
    """
    from bnn_adapt.bases.reactnet_checkpoint import load_reactnet_checkpoint  # noqa: PLC0415 - it uses check_state

    path = Path(path)
    if arch == "reactnet18":
        return load_reactnet_checkpoint(path, **arch_config)
    if not path.is_file():
        raise CheckpointError(f"base checkpoint {path} does not exist; {how_to_get}")
    payload = load_weights(path, "base checkpoint", how_to_get, error=CheckpointError)
    if not isinstance(payload, dict) or payload.get("arch") != arch:
        found = payload.get("arch") if isinstance(payload, dict) else type(payload).__name__
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
    trained_on = {**stored, "image_size": image_size}
    differs = [k for k, v in (expected or {}).items() if trained_on.get(k) is not None and trained_on[k] != v]
    if differs:
        fixes = " and ".join(CONFIG_KEYS.get(k, k + "={}").format(printable(trained_on[k])) for k in differs)
        raise CheckpointError(
            f"base checkpoint {path} holds {printable(describe(arch, {k: trained_on.get(k) for k in expected}))}, "
            f"but the config asks for {describe(arch, expected)}; set {fixes}, or pretrain a base for this config "
            f"({how_to_get})"
        )
    check_state(payload.get("state_dict"), expected_shapes(arch, stored), source, describe(arch, stored))
    base = rebuild(arch, stored)
    base.load_state_dict(payload["state_dict"])
    return base
