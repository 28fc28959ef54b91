"""BatchNorm folded for inference: one scale and one shift per channel, exactly.

In eval mode PyTorch's CPU BatchNorm kernel computes ``y = fma(x, a, b)`` per
channel with ``a = weight * (1 / sqrt(running_var + eps))`` and
``b = fma(-running_mean, a, bias)``, all in float32 (ATen's
``batch_norm_cpu_collect_linear_and_constant_terms``; the packed kernels'
epilogue computes the same, ``bnn_adapt/deploy/csrc/bitconv.c``).
:func:`fold_batch_norm` computes ``a`` and ``b`` that way, directly (no call
to a BatchNorm kernel, whose rules on ``eps`` differ between torch versions),
and :func:`load_folded` turns a BatchNorm into ``weight = a, bias = b,
running_mean = 0, running_var = 1, eps = FOLDED_EPS``, for which the kernel
computes the same ``a`` and ``b`` again: a folded layer gives bit-identical
outputs (tested for every input layout), and folding it again changes
nothing. Two stored values per channel replace four, which is what the size
formula charges a BatchNorm (docs/concepts.md, Size: its affine parameters; running
statistics are buffers).

Where only the sign of ``y`` is used later, it is ``x >= t`` (or ``x <= t``)
for one threshold per channel: :func:`sign_threshold` finds the exact float
``t`` by bisection over ``fma(x, a, b)``, which is monotone in ``x``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm

#: eps of a folded BatchNorm: positive (torch 2.11 rejects eps <= 0 even in eval mode), and so small that
#: ``1 + eps`` is 1 in float32 and float64, so the kernel's ``1 / sqrt(running_var + eps)`` is exactly 1
FOLDED_EPS = float(torch.finfo(torch.float32).tiny)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (C's ``fmaf``), for float32 tensors on any torch and device.

    In float64 the product is exact (24 + 24 bits) and TwoSum gives the sum's rounding error; rounding
    that sum to float32 is then wrong only when it lies exactly halfway between two floats while the
    error is not zero, and that case takes the neighbour on the error's side (Boldo & Melquiond 2008,
    "Emulation of FMA and correctly rounded sums")."""
    a, b, c = (t.detach().double() for t in torch.broadcast_tensors(a, b, c))
    product = a * b
    total = product + c
    back = total - product
    error = (product - (total - back)) + (c - back)
    rounded = total.float()
    other = torch.nextafter(rounded, torch.where(total > rounded.double(), float("inf"), float("-inf")).float())
    halfway = (total != rounded.double()) & ((rounded.double() + other.double()) / 2 == total)
    toward_other = (error > 0) == (other.double() > rounded.double())
    return torch.where(halfway & (error != 0) & toward_other, other, rounded)


@torch.no_grad()
def fold_batch_norm(
    bn: BatchNorm, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with which ``bn`` (eval mode) computes ``fma(x, scale, shift)``; ``weight`` / ``bias``
    stand in for its affine parameters (BitFit's task-specific copies; ``affine=False``: 1 and 0)."""
    mean, var = bn.running_mean.detach().float().cpu(), bn.running_var.detach().float().cpu()
    weight = bn.weight if weight is None else weight
    bias = bn.bias if bias is None else bias
    weight = torch.ones_like(mean) if weight is None else weight.detach().float().cpu()
    bias = torch.zeros_like(mean) if bias is None else bias.detach().float().cpu()
    # numpy's float32 sqrt is IEEE's (correctly rounded), as C's sqrtf; torch's vectorised float32 sqrt is not always
    invstd = np.float32(1.0) / np.sqrt(var.numpy() + np.float32(bn.eps))
    scale = torch.from_numpy(invstd) * weight
    return scale, fma32(-mean, scale, bias)


@torch.no_grad()
def load_folded(bn: BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``bn`` compute ``fma(x, scale, shift)`` (mean 0, variance 1, ``FOLDED_EPS``), in place."""
    bn.weight.copy_(scale)
    bn.bias.copy_(shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    mark_folded(bn)


def mark_folded(bn: BatchNorm) -> None:
    """Give a BatchNorm whose parameters hold a folded scale and shift the eps that keeps them exact."""
    bn.eps = FOLDED_EPS


def is_folded(bn: BatchNorm) -> bool:
    return bn.eps == FOLDED_EPS


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in the floats' order (-0.0 and 0.0 both 0)."""
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordered(key: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ordered`."""
    bits = torch.where(key >= 0, key, (-key) - 2**31)  # the sign bit set, as a signed int32
    return bits.to(torch.int32).view(torch.float32)


@torch.no_grad()
def sign_threshold(scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(direction, threshold)`` per channel: ``fma(x, scale, shift) >= 0`` exactly when
    ``direction * (x - threshold) >= 0``, for every float ``x``; direction +-1 (a constant sign gets
    direction +1 and threshold -inf or +inf)."""
    scale, shift = scale.float(), shift.float()

    def nonnegative(key: torch.Tensor) -> torch.Tensor:
        return fma32(_from_ordered(key), scale, shift) >= 0

    inf = _ordered(torch.tensor([float("inf")]))[0]
    rising = scale > 0
    # bisection for the boundary key: rising channels look for the smallest x with y >= 0, falling ones for the largest
    lo, hi = torch.full_like(scale, -inf, dtype=torch.int64), torch.full_like(scale, inf, dtype=torch.int64)
    for _ in range(33):
        mid = (lo + hi).div(2, rounding_mode="floor")
        ok = nonnegative(mid)
        go_low = ok == rising  # rising and ok: the boundary is at or below mid; falling and not ok: below mid
        hi = torch.where(go_low, mid, hi)
        lo = torch.where(go_low, lo, mid)
    threshold = _from_ordered(torch.where(rising, hi, lo))
    # a constant sign: no scale, or an infinite shift (a threshold folded before: folding it again is the same)
    constant = (scale == 0) | torch.isinf(shift)
    threshold = torch.where(constant & (shift >= 0), float("-inf"), threshold)
    threshold = torch.where(constant & (shift < 0), float("inf"), threshold)
    direction = torch.where((scale < 0) & ~constant, -1.0, 1.0)
    return direction, threshold
