"""Packed execution of a stored base: its binary layers run on bits, XNOR-popcount.

:func:`use_packed_kernels` turns a base (as :mod:`bnn_adapt.deploy.packed_base` rebuilds
it) into one whose binary convs and linears hold their weights as bits only and
compute on bit-packed activations with the kernels of :mod:`.packed_kernels`
(integer dot products, exact); the fp32 stem, BN, activations and the adapters
stay float. Per block:

* STE ResNet: ``x`` is packed once for conv1 and the 1x1 shortcut;
  ``sign(hardtanh(BN1(conv1)))`` is a per-channel interval test on conv1's
  integer output, so conv2's input never leaves bits; BN2, hardtanh, the
  residual (and the shortcut's BN) are applied by conv2's kernel epilogue.
* ReActNet-18: ``sign(x + move0)`` is packed from the float input;
  the epilogue applies the per-channel scale, BN, the shortcut (computed by
  torch: average pool, fp32 1x1 conv, BN), move1, PReLU and move2.

Module names, parameters of the float parts and ``isinstance`` checks stay as
they were (blocks change class in place, as :mod:`bnn_adapt.lean` does), so
adapters attach and run as on the float base: they read the same stage
outputs, hook binary convs (LoRA: such a block runs its layers one by one),
substitute BN tensors (BitFit, ``base.bn=adapt``) or binary weights
(``full_finetune``); every folded value is recomputed when a tensor it came
from changes. The binary weights themselves are placeholders on the ``meta``
device: the base stays in bits while it predicts. Inference only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.bases import rebuild
from bnn_adapt.deploy import packed_kernels as kernels
from bnn_adapt.deploy.packed_base import (
    decode_layout,
    read_packed,
    read_packed_base,
    to_packed_modules,
)
from bnn_adapt.deploy.packed_blocks import PACKED_BLOCKS, ChannelsLastStem
from bnn_adapt.deploy.packed_layers import PackedBinaryConv2d, PackedBinaryLayer, PackedBinaryLinear, refuse_ternary
from bnn_adapt.errors import ExportError
from bnn_adapt.nn.folding import mark_folded
from bnn_adapt.nn.layers import (
    BinaryConv2d,
    BinaryLinear,
    ChannelsLastMaxPool2d,
    PackedScaledBinaryConv2d,
)

log = logging.getLogger(__name__)


def _square(value) -> int | None:
    """An int or a pair of equal ints as one int; None for anything else (a string, unequal sides)."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    return pair[0] if len(pair) == 2 and pair[0] == pair[1] and isinstance(pair[0], int) else None


def unsupported(module: nn.Module) -> str | None:
    """What of a binary conv the kernels do not compute (None: nothing): they run a bias-free,
    ungrouped, undilated conv with one stride and one zero padding for both sides."""
    conv = isinstance(module, nn.Conv2d)
    kh, kw = module.weight.shape[-2:]
    problems = [
        "a bias" if conv and module.bias is not None else None,
        f"dilation {tuple(module.dilation)}" if conv and tuple(module.dilation) != (1, 1) else None,
        f"groups={module.groups}" if conv and module.groups != 1 else None,
        f"padding_mode={module.padding_mode!r}" if conv and module.padding_mode != "zeros" else None,
        f"stride {module.stride}" if _square(module.stride) is None else None,
        f"padding {module.padding!r}" if _square(module.padding) is None else None,
        f"a {kh}x{kw} kernel (more than {kernels.MAX_TAPS} taps)" if kh * kw > kernels.MAX_TAPS else None,
    ]
    found = [p for p in problems if p]
    return ", ".join(found) if found else None


def packed_layer(module: nn.Module, signs: torch.Tensor, name: str = "") -> PackedBinaryLayer | None:
    """The packed replacement of a binary layer whose input is binarised (not the STE stem,
    which reads the image), with weight signs ``signs``; None for any other module, and for a
    binary conv the kernels do not implement (:func:`unsupported`: it stays on the float path,
    with one warning line naming it)."""
    if isinstance(module, (PackedScaledBinaryConv2d, BinaryConv2d)) and getattr(module, "binarize_input", True):
        problem = unsupported(module)
        if problem is not None:
            log.warning(
                "packed 1-bit kernels: %s stays on the float path (the kernels do not implement %s)",
                name or type(module).__name__,
                problem,
            )
            return None
        scale = torch.ones(signs.shape[0]) if isinstance(module, PackedScaledBinaryConv2d) else None
        return PackedBinaryConv2d(signs, module.stride, module.padding, scale)
    if isinstance(module, BinaryLinear):
        return PackedBinaryLinear(module, signs)
    return None


def swap_blocks(base: nn.Module) -> nn.Module:
    """Blocks with a packed form (:data:`PACKED_BLOCKS`) take it; a float stem ending in a channels-last max
    pool runs channels-last with its BN folded."""
    for module in base.modules():
        if type(module) in PACKED_BLOCKS:
            module.__class__ = PACKED_BLOCKS[type(module)]
            getattr(module, "adopt", lambda: None)()
    stem = getattr(base, "stem", None)
    if type(stem) is nn.Sequential and len(stem) == 3 and isinstance(stem[-1], ChannelsLastMaxPool2d):
        stem.__class__ = ChannelsLastStem
    base.packed_kernels = True
    return base.eval().requires_grad_(False)


def use_packed_kernels(base: nn.Module) -> nn.Module:
    """Run ``base``'s binary convs and linears on bits from now on (in place; returns it).

    Binary layers whose input is binarised (not the STE stem, which reads the
    image) become :class:`PackedBinaryConv2d` / :class:`PackedBinaryLinear`
    holding their weights as bits; their fp32 weights are freed. A binary conv
    the kernels do not implement (a bias, dilation, groups, another padding
    mode, unequal strides or paddings) stays float, with one warning line.
    """
    refuse_ternary(base)
    if kernels.library() is None:
        raise RuntimeError("the packed 1-bit kernels are not built; reinstall with a C compiler (make install)")
    for name, module in list(base.named_modules()):
        if isinstance(module, PackedBinaryLayer) or getattr(module, "weight", None) is None:
            continue
        packed = packed_layer(module, module.weight.detach() >= 0, name)
        if packed is not None:
            if isinstance(packed, PackedBinaryConv2d) and packed.scale is not None:
                packed.scale = module.scale.detach().float().clone()
            if isinstance(packed, PackedBinaryLinear):
                packed.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, packed)
    return swap_blocks(base)


def load_packed_base(path: str | Path) -> tuple[nn.Module, dict]:
    """A packed base file straight onto the kernels: ``(base, header)``.

    The network is laid out on the meta device, each binary layer is built from
    its own bits and every other tensor takes its stored value, so no fp32 copy
    of a packed weight exists at any time (:func:`read_packed_base` + :func:`use_packed_kernels`
    give the same base after decoding every weight to fp32).
    """
    path = Path(path)
    header, binary, values = read_packed(path)
    with torch.device("meta"):
        base = to_packed_modules(rebuild(header["arch"], header["arch_config"]))
    bits = np.frombuffer(binary, np.uint8)
    state, binary_entries, folded = decode_layout(header, values)
    for name in folded:
        mark_folded(base.get_submodule(name))
    for name, shape, b in binary_entries:
        count = int(np.prod(shape)) if shape else 1
        chunk = np.unpackbits(bits[b // 8 : (b + count + 7) // 8 + 1], bitorder="little")[b % 8 : b % 8 + count]
        signs = torch.from_numpy(chunk.astype(bool)).reshape(shape)
        owner, _, _ = name.rpartition(".")
        packed = packed_layer(base.get_submodule(owner), signs, owner)
        if packed is None:  # a binary layer that stays float: the STE stem, a conv the kernels do not implement
            state[name] = torch.where(signs, 1.0, -1.0)
        else:
            parent, _, child = owner.rpartition(".")
            setattr(base.get_submodule(parent), child, packed)
    expected = {k for k, t in base.state_dict().items() if t.is_floating_point()}
    if not set(state) <= expected or any(not k.endswith(".weight") for k in expected - set(state)):
        wrong = sorted(set(state) ^ expected)[:5]
        raise ExportError(f"{path}: its layout does not fit a {header['arch']} {header['arch_config']} ({wrong})")
    base.load_state_dict(state, strict=False, assign=True)
    for module in base.modules():  # what the file leaves out (BN's batch counters) on the CPU
        for key, t in list(module._buffers.items()):
            if t is not None and t.is_meta:
                module._buffers[key] = torch.zeros(t.shape, dtype=t.dtype)
    return swap_blocks(base), header


def load_base(path: str | Path, packed: bool = True) -> tuple[nn.Module, dict]:
    """A packed base file on the 1-bit kernels (``packed`` and built) or on fp32 convs."""
    if packed and kernels.library() is not None:
        return load_packed_base(path)
    return read_packed_base(path)


def uses_packed_kernels(base: nn.Module) -> bool:
    return bool(getattr(base, "packed_kernels", False))


def packed_or_float(base: nn.Module, packed: bool = True) -> nn.Module:
    """``base`` on the 1-bit kernels when ``packed`` and they are built, else as it is (float);
    a missing kernel library costs one warning line."""
    if packed and not uses_packed_kernels(base) and kernels.library() is not None:
        return use_packed_kernels(base)
    return base
