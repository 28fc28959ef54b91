"""Bit packing for memory-lean backprop: 8 flags a byte, with torch ops only (any device)."""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

FLOAT16_MAX = 65504.0

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


def inside_mask(x: torch.Tensor, low: float, high: float, closed: bool) -> torch.Tensor | None:
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


def apply_mask(grad: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """grad where the packed flag is set, else 0 (as ``grad * mask.to(dtype)``, to the bit)."""
    return grad if packed is None else grad * _unpack(packed, grad.shape, "flags", grad.dtype)


def half_if_in_range(x: torch.Tensor) -> torch.Tensor:
    """x as saved for backward with low precision: float16 unless beyond its range."""
    if x.dtype == torch.float32 and x.numel():
        lo, hi = torch.aminmax(x)
        if max(-float(lo), float(hi)) <= FLOAT16_MAX:
            return x.to(torch.float16)
    return x
