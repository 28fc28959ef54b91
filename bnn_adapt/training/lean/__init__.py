"""Memory-lean backprop for binary networks (``memory=lean``).

Standard autograd keeps fp32 copies of whatever a binary layer touched; backward needs far less.
After Wang et al., "Enabling Binary Neural Network Training on the Edge" (arXiv:2102.04270), the
lean layers save only that and bit-pack what is binary (what each layer keeps: docs/speed.md,
"Lean backprop"). ``memory=lean`` is exact: gradients and training equal standard autograd's bit
for bit. ``memory=lean_fp16`` (``low_precision``) also stores what must stay real in float16 where
a binary network itself trains, an approximation; adaptation strategies never approximate.

Lean mode swaps the class of each known layer for a lean subclass (:func:`make_lean`); parameters,
buffers, state-dict keys, hooks and ``isinstance`` checks are unchanged, and :func:`make_standard`
swaps back.
"""

from __future__ import annotations

from torch import nn

from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import (
    ApproxSignActivation,
    BinaryConv2d,
    BinaryLinear,
    ChannelsLastMaxPool2d,
    ScaledBinaryConv2d,
    ternary_layer,
)
from bnn_adapt.training.lean.binary_layers import LeanBinaryConv2d, LeanBinaryLinear, LeanScaledBinaryConv2d
from bnn_adapt.training.lean.layers import (
    LeanApproxSign,
    LeanAvgPool2d,
    LeanBatchNorm1d,
    LeanBatchNorm2d,
    LeanChannelsLastMaxPool2d,
    LeanConv2d,
    LeanHardtanh,
    LeanMaxPool2d,
    LeanPReLU,
)
from bnn_adapt.training.lean.packing import pack_bits, unpack_bits, unpack_signs

LEAN_CLASSES: dict[type, type] = {
    BinaryConv2d: LeanBinaryConv2d,
    BinaryLinear: LeanBinaryLinear,
    ScaledBinaryConv2d: LeanScaledBinaryConv2d,
    ApproxSignActivation: LeanApproxSign,
    nn.Conv2d: LeanConv2d,
    nn.AvgPool2d: LeanAvgPool2d,
    nn.MaxPool2d: LeanMaxPool2d,
    ChannelsLastMaxPool2d: LeanChannelsLastMaxPool2d,
    nn.Hardtanh: LeanHardtanh,
    nn.PReLU: LeanPReLU,
    nn.BatchNorm1d: LeanBatchNorm1d,
    nn.BatchNorm2d: LeanBatchNorm2d,
}


STANDARD_CLASSES = {lean: standard for standard, lean in LEAN_CLASSES.items()}


MEMORY_MODES = ("standard", "lean", "lean_fp16")


def trains_binary_network(model: nn.Module) -> bool:
    """True for a bare base (``task=pretrain``) and for strategies that train it (``trains_base``)."""
    from bnn_adapt.bases.base import BaseNetwork

    return isinstance(model, BaseNetwork) or bool(getattr(model, "trains_base", False))


def make_lean(model: nn.Module, low_precision: bool | None = False) -> nn.Module:
    """Switch every known layer of ``model`` to its lean class, in place.

    ``low_precision``: False (default), exact lean gradients; True, the
    approximate float16 storage of the module notes; None, that storage only
    if ``model`` trains a binary network (:func:`trains_binary_network`, what
    ``memory=lean_fp16`` does). Only
    layers of exactly a listed class switch (a subclass may have its own
    forward). Returns ``model``.
    """
    ternary = ternary_layer(model)
    if ternary is not None:
        raise ConfigError(
            f"memory=lean saves binary activations as 1-bit signs, but {ternary} binarises as the thesis code "
            "(base.binarize=thesis_code: sign(0) = 0, ternary); use memory=standard"
        )
    if low_precision is None:
        low_precision = trains_binary_network(model)
    for module in model.modules():
        lean = LEAN_CLASSES.get(type(module), type(module) if type(module) in STANDARD_CLASSES else None)
        if lean is not None:
            module.__class__ = lean
            module.lean_low_precision = bool(low_precision)
    return model


def make_standard(model: nn.Module) -> nn.Module:
    """Undo :func:`make_lean`, in place."""
    for module in model.modules():
        standard = STANDARD_CLASSES.get(type(module))
        if standard is not None:
            module.__class__ = standard
            module.__dict__.pop("lean_low_precision", None)
    return model


def is_lean(model: nn.Module) -> bool:
    return any(type(m) in STANDARD_CLASSES for m in model.modules())


def set_memory_mode(model: nn.Module, memory: str) -> nn.Module:
    """``memory``: ``standard`` (autograd as is), ``lean`` (exact) or
    ``lean_fp16`` (float16 storage where a binary network trains)."""
    if memory not in MEMORY_MODES:
        from bnn_adapt.errors import ConfigError

        raise ConfigError(f"memory={memory!r} is invalid: use one of {', '.join(MEMORY_MODES)}")
    if memory == "standard":
        return make_standard(model)
    return make_lean(make_standard(model), low_precision=None if memory == "lean_fp16" else False)


__all__ = [
    "LEAN_CLASSES",
    "MEMORY_MODES",
    "STANDARD_CLASSES",
    "is_lean",
    "make_lean",
    "make_standard",
    "pack_bits",
    "set_memory_mode",
    "trains_binary_network",
    "unpack_bits",
    "unpack_signs",
]
