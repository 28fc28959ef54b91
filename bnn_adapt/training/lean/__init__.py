"""Memory-lean backprop for binary networks (``memory=lean``, SPEC 7).

Standard autograd keeps fp32 copies of whatever a binary layer touched: the
real input of every sign, the +-1 tensor fed to the conv, the binarised
weights, the input of every BN and hardtanh. Backward needs far less. After
Wang et al., "Enabling Binary Neural Network Training on the Edge" (ICLR 2021
workshop / arXiv:2102.04270), the lean layers below save only that, and
bit-pack what is binary:

==================================  ===========================================
layer                               saved for backward (lean)
==================================  ===========================================
binary conv / linear, sign input    sign(x), 1 bit, only if the weight trains;
                                    the ``|x| <= 1`` straight-through mask,
                                    1 bit, only if x needs a gradient and the
                                    mask is not all ones (after a hardtanh it
                                    always is: nothing). Frozen layers save no
                                    input at all; binarised weights are
                                    recomputed from the latent ones.
ReActNet scaled conv (+-1 input)    sign(x), 1 bit, only if the weight trains
hardtanh                            the ``-1 < x < 1`` mask, 1 bit (nothing
                                    when every element is inside)
BN, eval mode, frozen affine        its per-channel scale only (1/std, gamma)
PReLU, frozen slope                 the ``x > 0`` mask, 1 bit
fp32 conv, frozen weight            nothing (ReActNet's shortcut convs)
average pooling                     nothing (its gradient is uniform)
max pooling                         where in its window each maximum was, 1 byte
==================================  ===========================================

All of that is exact: gradients equal standard autograd's bit for bit (the
tests pin it). ``memory=lean_fp16`` goes further where a binary
network is *trained* (``task=pretrain``, a strategy that ``trains_base``: ``low_precision``)
and follows the paper's lower-precision storage for what must stay real, an
approximation:

* BN in training mode (or with trainable affine) saves its centred input
  ``x - mean`` in float16, rounded to a relative 2^-11 (per-channel statistics
  stay fp32; a tensor beyond float16's range stays fp32).
* A trainable PReLU saves its input in float16 (plus the 1-bit ``x > 0`` mask,
  so the input gradient stays exact); so does a trainable fp32 conv.
* ReActNet's approx-sign saves its input clamped to [-1, 1] in float16 (its
  derivative ``max(0, 2 - 2|x|)`` is then off by at most 2^-10).

Adaptation strategies keep ``low_precision`` off even then: their lean
gradients are exact, and layers that would need a real-valued copy use
standard autograd. ``memory=lean`` never approximates: training is
bit-identical to standard autograd, with the real-valued copies fp32. (On the
demo's base, 3 seeds, ``lean`` reproduced standard's training bit for bit;
``lean_fp16`` moved the final top-1 by up to 1.3 points, as any perturbation of
a binary network's training does: docs/speed.md.)

Lean mode swaps the class of each known layer for a lean subclass
(:func:`make_lean`); parameters, buffers, state-dict keys, hooks and
``isinstance`` checks are unchanged, and :func:`make_standard` swaps back.
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
