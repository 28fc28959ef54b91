"""Quantizers: what a binary layer does to a real tensor, with its gradient.

As in Larq's ``quantizers`` module, these are small functions apart from the
layers that use them (:mod:`bnn_adapt.nn.layers`):

* :func:`sign` -- sign with sign(0) = +1 (BinaryNet), no gradient;
* :func:`binarize` -- sign forward, straight-through backward cancelled where
  ``|x| > 1`` (the hardtanh derivative; Hubara et al. 2016);
* :func:`approx_sign` -- sign forward, ReActNet/Bi-Real's piecewise-polynomial
  gradient backward (Liu et al. 2018);
* :func:`scaled_sign` / :class:`ScaledSignSTE` -- magnitude-aware sign:
  ``mean|W|`` per output channel times sign(W) (ReActNet's weights).
"""

from __future__ import annotations

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1 (also for -0.0), as in BinaryNet; never in place.

    sign(sign(x) + 0.5) maps -1/0/+1 to -1/+1/+1 in three cheap passes over one
    new tensor: several times faster on CPU than ``torch.where`` with filled
    tensors, which dominated the frozen base's forward pass (SPEC 7).
    """
    return torch.sign(x).add_(0.5).sign_()


class SignSTE(torch.autograd.Function):
    """sign(x) forward; gradient * 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


class ApproxSign(torch.autograd.Function):
    """sign(x) forward; ReActNet/Bi-Real's piecewise-polynomial gradient backward.

    The gradient of the quadratic approximation of sign: 2 + 2x on [-1, 0),
    2 - 2x on [0, 1), 0 elsewhere; closer to sign than the STE's box.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    return ApproxSign.apply(x)


def scaled_sign(w: torch.Tensor) -> torch.Tensor:
    """mean|W| per output channel * sign(W): ReActNet's binary weights."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) * sign(w)


class ScaledSignSTE(torch.autograd.Function):
    """mean|W| (per output channel) * sign(W) forward; gradient * 1{|W| <= 1} back.

    As the authors' ``HardBinaryConv`` in training: the scale is treated as a
    constant and the weight sees the gradient of clamp(W, -1, 1).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return scaled_sign(w)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad_output * (w.abs() <= 1).to(grad_output.dtype)
