"""Lean binary conv / linear: sign(x) (or a given input) times binarised weights, saving 1-bit signs and masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear, ScaledBinaryConv2d
from bnn_adapt.nn.quantizers import scaled_sign, sign
from bnn_adapt.training.lean.packing import apply_mask, inside_mask, pack_bits, unpack_signs

STE, BINARY, REAL = "ste", "binary", "real"  # what a binary layer does to its input


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
            grad,
            x,
            weight,
            bias_sizes,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            self.groups,
            list(needs),
        )


class _LinearOp:
    """linear, and its backward in autograd's own order.

    ``F.linear`` runs ``addmm(bias, x, weight.t())``; autograd's ``mm_mat2_backward``
    sees a transposed ``weight.t()`` and computes the weight gradient as
    ``grad.t() @ x``. ``(x.t() @ grad).t()`` holds the same sums in another order:
    identical at batch 6, different in the last bits at batch 64 (320 -> 5).
    """

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, grad, x, weight, needs):
        return (
            grad.mm(weight) if needs[0] else None,
            grad.t().mm(x) if needs[1] else None,
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
        mask = inside_mask(x, -1.0, 1.0, closed=True) if need_x and input_kind == STE else None
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
            grad_x = apply_mask(grad_x, mask)
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
