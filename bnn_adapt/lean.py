"""Memory-lean backprop for binary networks (``trainer.memory=lean``, SPEC 7).

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
tests pin it). ``trainer.memory=lean_fp16`` goes further where a binary
network is *trained* (``task=pretrain``, ``full_finetune``: ``low_precision``)
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
standard autograd. ``trainer.memory=lean`` never approximates: training is
bit-identical to standard autograd, with the real-valued copies fp32. (On the
digits base, 3 seeds, ``lean`` reproduced standard's final top-1 exactly;
``lean_fp16`` differed by up to 8 points per seed, as any perturbation of a
binary network's training does: see README.)

Lean mode swaps the class of each known layer for a lean subclass
(:func:`make_lean`); parameters, buffers, state-dict keys, hooks and
``isinstance`` checks are unchanged, and :func:`make_standard` swaps back.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_adapt.bases.reactnet import ApproxSignActivation, ChannelsLastMaxPool2d, ScaledBinaryConv2d, scaled_sign
from bnn_adapt.binary import BinaryConv2d, BinaryLinear, sign

STE, BINARY, REAL = "ste", "binary", "real"  # what a binary layer does to its input
FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------
# bit packing (torch ops only, so it runs on any device)

_PACK = 0x0102040810204080  # byte i (0 or 1) of an int64 word -> bit i of its top byte
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (N, ...) -> uint8 (N, ceil(numel / N / 8)): 8 flags a byte.

    The leading (batch) dimension is kept, so packed activations still look
    per-sample to a memory meter. Eight flags are gathered at once by one
    multiply of the int64 word holding them; its top byte is the packed byte.
    """
    rows = mask.shape[0] if mask.dim() else 1
    flat = mask.reshape(rows, -1).view(torch.uint8)
    pad = -flat.shape[1] % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    words = flat.contiguous().view(torch.int64) * _PACK
    if _LITTLE_ENDIAN:
        return words.view(torch.uint8)[:, 7::8].contiguous()
    return (words >> 56).to(torch.uint8)


@functools.cache
def _lookup(kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Byte value -> its 8 flags (bit i = element i), as bool, 0/1 or +-1."""
    flags = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    table = {"bool": flags.bool(), "flags": flags.to(dtype), "signs": flags.to(dtype) * 2 - 1}[kind]
    return table.to(device)


def _unpack(packed: torch.Tensor, shape: torch.Size, kind: str, dtype: torch.dtype) -> torch.Tensor:
    table = _lookup(kind, dtype if kind != "bool" else torch.bool, packed.device)
    values = table[packed.long()].reshape(packed.shape[0], -1)
    n = shape.numel() // packed.shape[0] if len(shape) else 1
    return (values if values.shape[1] == n else values[:, :n]).reshape(shape)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    return _unpack(packed, shape, "bool", torch.bool)


def unpack_signs(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``x >= 0`` flags -> the +-1 tensor sign(x) in ``dtype``."""
    return _unpack(packed, shape, "signs", dtype)


def _inside_mask(x: torch.Tensor, low: float, high: float, closed: bool) -> torch.Tensor | None:
    """Packed flags of ``low <= x <= high`` (``closed``) or ``low < x < high``;
    None when every element is inside (one cheap min/max pass tells)."""
    if x.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(x))
    if (low <= lo and hi <= high) if closed else (low < lo and hi < high):
        return None
    if low == -high:
        return pack_bits(x.abs() <= high if closed else x.abs() < high)
    return pack_bits((x >= low) & (x <= high) if closed else (x > low) & (x < high))


def _apply_mask(grad: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """grad where the packed flag is set, else 0 (as ``grad * mask.to(dtype)``, to the bit)."""
    return grad if packed is None else grad * _unpack(packed, grad.shape, "flags", grad.dtype)


def _half_if_in_range(x: torch.Tensor) -> torch.Tensor:
    """x as saved for backward with low precision: float16 unless beyond its range."""
    if x.dtype == torch.float32 and x.numel():
        lo, hi = torch.aminmax(x)
        if max(-float(lo), float(hi)) <= FLOAT16_MAX:
            return x.to(torch.float16)
    return x


# ---------------------------------------------------------------------------
# binary conv / linear: sign(x) (or a given input) times binarised weights


class _ConvOp:
    """conv2d with a module's geometry, and its backward (the aten kernel autograd uses)."""

    def __init__(self, conv: nn.Module):
        self.stride, self.padding = _pair(conv.stride), _pair(conv.padding)
        self.dilation = _pair(getattr(conv, "dilation", 1))
        self.groups = getattr(conv, "groups", 1)

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad, x, weight, needs):
        bias_sizes = [weight.shape[0]] if needs[2] else None
        return torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, list(needs),
        )  # fmt: skip


class _LinearOp:
    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, grad, x, weight, needs):
        return (
            grad.mm(weight) if needs[0] else None,
            x.t().mm(grad).t() if needs[1] else None,
            grad.sum(0) if needs[2] else None,
        )


class _BinaryLayerFn(torch.autograd.Function):
    """out = op(input', binarised W, bias); input' = sign(x) (STE), x (+-1 or real).

    Weight gradient: straight-through, cancelled where ``|W| > 1`` (SignSTE /
    ScaledSignSTE). Input gradient for STE inputs: cancelled where ``|x| > 1``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op, input_kind, scaled):
        ctx.op, ctx.input_kind, ctx.scaled, ctx.x_shape = op, input_kind, scaled, x.shape
        need_x, need_w = ctx.needs_input_grad[:2]
        w = scaled_sign(weight) if scaled else sign(weight)
        out = op.forward(sign(x) if input_kind == STE else x, w, bias)
        mask = _inside_mask(x, -1.0, 1.0, closed=True) if need_x and input_kind == STE else None
        kept = None
        if need_w:
            kept = x if input_kind == REAL else pack_bits(x >= 0)
        ctx.save_for_backward(weight, kept, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, kept, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # under autocast the forward ran in grad's dtype (+-1 and the images are exact in it)
        w = (scaled_sign(weight) if ctx.scaled else sign(weight)).to(grad.dtype)
        if not need_w:  # the kernel reads only the input's shape
            x = grad.new_empty(ctx.x_shape)
        elif ctx.input_kind == REAL:
            x = kept.to(grad.dtype)
        else:
            x = unpack_signs(kept, ctx.x_shape, grad.dtype)
        grad_x, grad_w, grad_b = ctx.op.backward(grad, x, w, (need_x, need_w, need_b))
        if grad_x is not None and ctx.input_kind == STE:
            grad_x = _apply_mask(grad_x, mask)
        if grad_w is not None:
            grad_w = grad_w * (weight.abs() <= 1).to(grad_w.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class LeanBinaryConv2d(BinaryConv2d):
    """:class:`BinaryConv2d` saving 1-bit signs / masks (see the module table)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        kind = STE if self.binarize_input else REAL
        return _BinaryLayerFn.apply(x, self.weight, self.bias, _ConvOp(self), kind, False)


class LeanBinaryLinear(BinaryLinear):
    """:class:`BinaryLinear` saving 1-bit signs / masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.dim() != 2:
            return super().forward(x)
        return _BinaryLayerFn.apply(x, self.weight, self.bias, _LinearOp(), STE, False)


class LeanScaledBinaryConv2d(ScaledBinaryConv2d):
    """ReActNet's scaled conv; its input is the block's +-1 sign, saved as 1 bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _BinaryLayerFn.apply(x, self.weight, None, _ConvOp(self), BINARY, True)


# ---------------------------------------------------------------------------
# real-valued layers of a base (ReActNet's stem and shortcut convs, pooling)


class _ConvFn(torch.autograd.Function):
    """A real-valued conv keeping its input only if its weight trains (then in float16)."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.op, ctx.x_shape = op, x.shape
        ctx.save_for_backward(weight, _half_if_in_range(x) if ctx.needs_input_grad[1] else None)
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, kept = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        x = kept.to(grad.dtype) if kept is not None else grad.new_empty(ctx.x_shape)
        grad_x, grad_w, grad_b = ctx.op.backward(grad, x, weight.to(grad.dtype), needs)
        return grad_x, grad_w, grad_b, None


class LeanConv2d(nn.Conv2d):
    """fp32 conv: a frozen one keeps nothing (backward needs only its weight);
    a trainable one keeps its input in float16 with low precision, else as standard."""

    lean_low_precision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = self.weight.requires_grad
        if (
            not torch.is_grad_enabled()
            or (trains and not self.lean_low_precision)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return super().forward(x)
        return _ConvFn.apply(x, self.weight, self.bias, _ConvOp(self))


class _AvgPoolFn(torch.autograd.Function):
    """Average pooling: backward spreads the gradient evenly, so it keeps only the input's shape."""

    @staticmethod
    def forward(ctx, x, args):
        ctx.x_shape, ctx.args = x.shape, args
        return F.avg_pool2d(x, *args)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.aten.avg_pool2d_backward(grad, grad.new_empty(ctx.x_shape), *ctx.args), None


class LeanAvgPool2d(nn.AvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 4:
            return super().forward(x)
        kernel = _pair(self.kernel_size)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        args = (kernel, stride, _pair(self.padding), self.ceil_mode, self.count_include_pad, self.divisor_override)
        return _AvgPoolFn.apply(x, args)


class _MaxPoolFn(torch.autograd.Function):
    """Max pooling keeping, per output, where in its window the maximum was: one byte
    (PyTorch keeps the input and an int64 index into the whole plane)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.x_shape, ctx.args = x.shape, (kernel, stride, padding, dilation, ceil_mode)
        row, col = _window_origin(out.shape, x.shape[-1], stride, padding, index.device)
        width = x.shape[-1]
        offset = ((index // width - row) // dilation[0]) * kernel[1] + (index % width - col) // dilation[1]
        ctx.save_for_backward(offset.to(torch.uint8))
        return out

    @staticmethod
    def backward(ctx, grad):
        (offset,) = ctx.saved_tensors
        kernel, stride, padding, dilation, _ = ctx.args
        width = ctx.x_shape[-1]
        row, col = _window_origin(grad.shape, width, stride, padding, grad.device)
        offset = offset.long()
        index = (row + offset // kernel[1] * dilation[0]) * width + col + offset % kernel[1] * dilation[1]
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, grad.new_empty(ctx.x_shape), *ctx.args, index
        )
        return grad_x, None, None, None, None, None


def _window_origin(out_shape, width, stride, padding, device):
    """Input row and column of each output's window corner, broadcastable to ``out_shape``."""
    rows = torch.arange(out_shape[-2], device=device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(out_shape[-1], device=device).view(1, -1) * stride[1] - padding[1]
    return rows, cols


class LeanMaxPool2d(nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _pair(self.kernel_size)
        if not (torch.is_grad_enabled() and x.requires_grad) or self.return_indices or kernel[0] * kernel[1] > 256:
            return super().forward(x)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        return _MaxPoolFn.apply(x, kernel, stride, _pair(self.padding), _pair(self.dilation), self.ceil_mode)


class LeanChannelsLastMaxPool2d(LeanMaxPool2d, ChannelsLastMaxPool2d):
    """Lean with autograd; without it, :class:`ChannelsLastMaxPool2d`'s fast path (next in the MRO)."""


# ---------------------------------------------------------------------------
# activations


class _HardtanhFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, min_val, max_val):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(_inside_mask(x, min_val, max_val, closed=False))
        return F.hardtanh(x, min_val, max_val)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _apply_mask(grad, mask), None, None


class LeanHardtanh(nn.Hardtanh):
    """Hardtanh saving its 1-bit pass-through mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _HardtanhFn.apply(x, float(self.min_val), float(self.max_val))


class _ApproxSignFn(torch.autograd.Function):
    """sign(x); backward ``max(0, 2 - 2|x|)`` from x kept in float16 (clamped to [-1, 1]:
    the derivative is 0 beyond, and float16 is finest there)."""

    @staticmethod
    def forward(ctx, x):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x.clamp(-1.0, 1.0).to(torch.float16))
        return sign(x)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * kept.to(grad.dtype).abs()).clamp_min(0.0)


class LeanApproxSign(ApproxSignActivation):
    """ReActNet's sign; low precision keeps its input in float16 (exact: fp32, as standard)."""

    lean_low_precision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.lean_low_precision and torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _ApproxSignFn.apply(x)


class _PReLUFn(torch.autograd.Function):
    """PReLU saving ``x > 0`` (1 bit), plus x in float16 when the slope trains."""

    @staticmethod
    def forward(ctx, x, weight):
        positive = x > 0
        need_w = ctx.needs_input_grad[1]
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight, pack_bits(positive), _half_if_in_range(x) if need_w else None)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad):
        weight, packed, x = ctx.saved_tensors
        positive = unpack_bits(packed, ctx.x_shape)
        slope = weight if weight.numel() == 1 else weight.view(1, -1, *([1] * (grad.dim() - 2)))
        grad_x = torch.where(positive, grad, slope * grad) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            below = torch.where(positive, 0.0, x.to(grad.dtype) * grad)
            dims = [d for d in range(grad.dim()) if d != 1 or weight.numel() == 1]
            grad_w = below.sum(dims).reshape(weight.shape)
        return grad_x, grad_w


class LeanPReLU(nn.PReLU):
    """PReLU: 1 bit when the slope is frozen; float16 input when it trains (low precision)."""

    lean_low_precision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        if self.weight.requires_grad and not self.lean_low_precision:
            return super().forward(x)
        return _PReLUFn.apply(x, self.weight)


# ---------------------------------------------------------------------------
# batch norm


class _FrozenBatchNormFn(torch.autograd.Function):
    """Eval-mode BN with frozen affine: a per-channel affine map, so backward
    needs only its scale ``gamma / sqrt(var + eps)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        # 1/sqrt in double, then grad * invstd * weight: PyTorch's own eval-mode kernel, to the bit
        invstd = torch.sqrt(running_var.double() + eps).reciprocal().to(running_var.dtype)
        ctx.save_for_backward(invstd, weight)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        invstd, weight = ctx.saved_tensors
        shape = (1, -1, *([1] * (grad.dim() - 2)))
        grad_x = grad * invstd.view(shape)
        if weight is not None:
            grad_x.mul_(weight.view(shape))
        return grad_x, None, None, None, None, None


class _LowPrecisionBatchNormFn(torch.autograd.Function):
    """BN (any mode) saving its centred input ``x - mean`` in float16.

    Centred, float16's relative error 2^-11 applies to ``x - mean`` itself, so
    the normalised values stay accurate even where the mean dwarfs the spread.
    Backward is PyTorch's own kernel, given the centred input and a zero mean.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        mean = save_mean if training else running_mean
        centred = x - mean.view(1, -1, *([1] * (x.dim() - 2)))
        ctx.training, ctx.eps = training, eps
        ctx.save_for_backward(_half_if_in_range(centred), weight, running_var, save_invstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        centred, weight, running_var, save_invstd = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        zero = torch.zeros_like(save_invstd if ctx.training else running_var)  # the mean of centred values
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), centred.to(grad.dtype), weight, zero, running_var,
            zero, save_invstd, ctx.training, ctx.eps, needs,
        )  # fmt: skip
        return grad_x, grad_w, grad_b, None, None, None, None, None


class LeanBatchNorm:
    """Mixin for BN layers: frozen eval BN keeps its scale only; with low
    precision, BN that trains keeps its input in float16; else standard."""

    lean_low_precision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affine_trains = any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        if not torch.is_grad_enabled() or not (x.requires_grad or affine_trains):
            return super().forward(x)
        self._check_input_dim(x)
        uses_running = not self.training and self.running_mean is not None
        if uses_running and not affine_trains:
            return _FrozenBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        if not self.lean_low_precision:
            return super().forward(x)
        # nn.BatchNorm's own bookkeeping of running statistics
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        return _LowPrecisionBatchNormFn.apply(
            x, self.weight, self.bias,
            self.running_mean if keep_running else None, self.running_var if keep_running else None,
            batch_stats, factor, self.eps,
        )  # fmt: skip


class LeanBatchNorm1d(LeanBatchNorm, nn.BatchNorm1d):
    pass


class LeanBatchNorm2d(LeanBatchNorm, nn.BatchNorm2d):
    pass


# ---------------------------------------------------------------------------
# switching a model


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
    """True for a bare base (``task=pretrain``) and for strategies that train it (full finetune)."""
    from bnn_adapt.bases.base import BaseNetwork

    return isinstance(model, BaseNetwork) or bool(getattr(model, "trains_base", False))


def make_lean(model: nn.Module, low_precision: bool | None = False) -> nn.Module:
    """Switch every known layer of ``model`` to its lean class, in place.

    ``low_precision``: False (default), exact lean gradients; True, the
    approximate float16 storage of the module notes; None, that storage only
    if ``model`` trains a binary network (:func:`trains_binary_network`, what
    ``trainer.memory=lean_fp16`` does). Only
    layers of exactly a listed class switch (a subclass may have its own
    forward). Returns ``model``.
    """
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
    """``trainer.memory``: ``standard`` (autograd as is), ``lean`` (exact) or
    ``lean_fp16`` (float16 storage where a binary network trains)."""
    if memory not in MEMORY_MODES:
        from bnn_adapt.errors import ConfigError

        raise ConfigError(f"trainer.memory={memory!r} is invalid: use one of {', '.join(MEMORY_MODES)}")
    if memory == "standard":
        return make_standard(model)
    return make_lean(make_standard(model), low_precision=None if memory == "lean_fp16" else False)
