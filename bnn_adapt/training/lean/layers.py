"""Lean real-valued layers of a base: convs, pooling, hardtanh, approx-sign, PReLU and BN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_adapt.nn.layers import ApproxSignActivation, ChannelsLastMaxPool2d
from bnn_adapt.nn.quantizers import sign
from bnn_adapt.training.lean.binary_layers import _ConvOp
from bnn_adapt.training.lean.packing import apply_mask, half_if_in_range, inside_mask, pack_bits, unpack_bits


class _ConvFn(torch.autograd.Function):
    """A real-valued conv keeping its input only if its weight trains (then in float16)."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.op, ctx.x_shape = op, x.shape
        ctx.save_for_backward(weight, half_if_in_range(x) if ctx.needs_input_grad[1] else None)
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
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, grad.new_empty(ctx.x_shape), *ctx.args, index)
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


class _HardtanhFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, min_val, max_val):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(inside_mask(x, min_val, max_val, closed=False))
        return F.hardtanh(x, min_val, max_val)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return apply_mask(grad, mask), None, None


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
        ctx.save_for_backward(weight, pack_bits(positive), half_if_in_range(x) if need_w else None)
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
        ctx.save_for_backward(half_if_in_range(centred), weight, running_var, save_invstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        centred, weight, running_var, save_invstd = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        zero = torch.zeros_like(save_invstd if ctx.training else running_var)  # the mean of centred values
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(),
            centred.to(grad.dtype),
            weight,
            zero,
            running_var,
            zero,
            save_invstd,
            ctx.training,
            ctx.eps,
            needs,
        )
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
            x,
            self.weight,
            self.bias,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            batch_stats,
            factor,
            self.eps,
        )


class LeanBatchNorm1d(LeanBatchNorm, nn.BatchNorm1d):
    pass


class LeanBatchNorm2d(LeanBatchNorm, nn.BatchNorm2d):
    pass
