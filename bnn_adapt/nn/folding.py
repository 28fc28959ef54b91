"""BatchNorm folded for inference: one scale and one shift per channel, exactly.

In eval mode PyTorch's BatchNorm computes ``y = x * a + b`` per channel, with
``a = weight / sqrt(running_var + eps)`` and ``b = bias - running_mean * a``
worked out inside the kernel. :func:`fold_batch_norm` takes ``a`` and ``b``
from that very kernel (``a`` is its output for x = 1 with zero mean and
bias, ``b`` its output for x = 0), and :func:`load_folded` turns a BatchNorm
into ``weight = a, bias = b, running_mean = 0, running_var = 1, eps = 0``,
for which the kernel computes the same ``a`` and ``b`` again: a folded layer
gives bit-identical outputs (tested for every input layout), and folding it
again changes nothing. Two stored values per channel replace four, which is
what the size formula charges a BatchNorm (SPEC 4: its affine parameters;
running statistics are buffers).

Where only the sign of ``y`` is used later, it is ``x >= t`` (or ``x <= t``)
for one threshold per channel: :func:`sign_threshold` finds the exact float
``t`` by bisection over the kernel's own outputs, which are monotone in ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def fold_batch_norm(bn: BatchNorm, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(scale, shift)`` with which ``bn`` (eval mode) computes ``x * scale + shift``; ``weight`` / ``bias``
    stand in for its affine parameters (BitFit's task-specific copies)."""
    weight = (bn.weight if weight is None else weight).detach().float().cpu()
    bias = (bn.bias if bias is None else bias).detach().float().cpu()
    mean, var = bn.running_mean.detach().float().cpu(), bn.running_var.detach().float().cpu()
    zeros = torch.zeros_like(mean)
    scale = F.batch_norm(torch.ones(1, len(mean)), zeros, var, weight, zeros, False, 0.0, bn.eps)
    shift = F.batch_norm(torch.zeros(1, len(mean)), mean, var, weight, bias, False, 0.0, bn.eps)
    return scale.reshape(-1), shift.reshape(-1)


@torch.no_grad()
def load_folded(bn: BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``bn`` compute ``x * scale + shift`` (mean 0, variance 1, eps 0), in place."""
    bn.weight.copy_(scale)
    bn.bias.copy_(shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0


def is_folded(bn: BatchNorm) -> bool:
    return bn.eps == 0.0


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
    """``(direction, threshold)`` per channel: ``x * scale + shift >= 0`` (as the kernel computes it) exactly
    when ``direction * (x - threshold) >= 0``, for every float ``x``; direction +-1 (a constant sign gets
    direction +1 and threshold -inf or +inf)."""
    scale, shift = scale.float(), shift.float()
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)

    def nonnegative(key: torch.Tensor) -> torch.Tensor:
        x = _from_ordered(key).reshape(1, -1)
        return F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 0.0).reshape(-1) >= 0

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
    constant = scale == 0
    threshold = torch.where(constant & (shift >= 0), float("-inf"), threshold)
    threshold = torch.where(constant & (shift < 0), float("inf"), threshold)
    direction = torch.where(scale < 0, -1.0, 1.0)
    return direction, threshold
