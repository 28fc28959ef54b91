"""What a base file from someone else may declare, checked before anything is built from it.

A checkpoint or packed base names its architecture and constructor arguments; an edited number could make
the network it builds take gigabytes, and an edited tensor could make it compute nonsense. So the arguments
are checked against the constructor's own (types, the base's ``arch_limits``), the network is laid out on PyTorch's
meta device (shapes, no memory), and the file's tensors are compared with that layout and checked finite.
"""

from __future__ import annotations

import inspect
import math

import torch

from bnn_adapt.bases.base import BASES, rebuild
from bnn_adapt.errors import CheckpointError, ConfigError, UserError, printable
from bnn_adapt.files import require_finite


def checked_arch(arch: object, arch_config: object, source: str, error: type[UserError] = CheckpointError) -> dict:
    """A received file's architecture, checked before anything is built: a known ``arch`` and a dict of
    that constructor's own arguments, each a plain value of the default's type within its ``arch_limits``.
    Returns them as a dict of plain values."""
    if not isinstance(arch, str) or arch not in BASES:
        raise error(
            f"{source} declares the architecture {printable(repr(arch))[:80]}, which this version does "
            f"not know (known: {', '.join(BASES)}); a base defined elsewhere is known once base=<its config> "
            "imports its module"
        )
    if not isinstance(arch_config, dict):
        raise error(
            f"{source} declares no architecture arguments (arch_config is {type(arch_config).__name__}, not a dict)"
        )
    params = {k: p for k, p in inspect.signature(BASES[arch].__init__).parameters.items() if k != "self"}
    unknown = sorted(map(str, set(arch_config) - set(params)))
    if unknown:
        raise error(
            f"{source} declares {printable(', '.join(unknown))[:120]} for {arch}, whose arguments are "
            f"{', '.join(params)}"
        )
    for key, value in arch_config.items():
        default = params[key].default
        kind, word = {float: ((int, float), "a number"), int: (int, "an integer")}.get(type(default), (str, "a string"))
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise error(f"{source} declares {arch} {key}={printable(repr(value))[:80]}, not {word}")
        low, high = BASES[arch].arch_limits.get(key, (None, None))
        if low is not None and not low <= value <= high:
            raise error(f"{source} declares {arch} {key}={value}, outside {low}..{high}")
    config = dict(arch_config)
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
        isinstance(k, str)
        and torch.is_tensor(v)
        and v.layout == torch.strided
        and not v.is_quantized
        and not v.is_complex()
        for k, v in state.items()
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
