"""Parameter accounting and the size metric (docs/concepts.md, Size), at real bit widths.

Binary parameters are those a :class:`~bnn_adapt.nn.layers.BinaryModule` lists
(1 bit each); a weight trained below 32 bits (``adapter.bits``, a layer with a
``weight_quantizer``) costs its width, plus one fp32 scale per output channel
(counted as fp32 values, row ``<layer>.weight_scale``); everything else that is
a parameter is fp32 (BN running stats are buffers and do not count). A pruned
tensor counts its non-zeros (a pruned quantised weight its non-zero codes), and
a pruned quantised layer the scales of its channels that keep any weight.

    size % = (32 * n_fp32 + b * n_b + n_bin) / (32 * N_fp32 + N_bin) * 100
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from bnn_adapt.nn.layers import BinaryModule, quantized_weight, weight_bits

KIND_WIDTH = {"binary": 1, "fp32": 32}


@dataclass
class LayerCount:
    name: str
    kind: str  # "binary", "fp32" or "quantized" (a weight trained at bit_width < 32 bits)
    params: int
    bit_width: int = 0  # bits per parameter; 0: the kind's (binary 1, fp32 32)

    @property
    def width(self) -> int:
        return self.bit_width or KIND_WIDTH[self.kind]

    @property
    def bits(self) -> int:
        return self.params * self.width


def _live_rows(module: nn.Module) -> int:
    weight = module.weight.detach()
    return int((weight.reshape(weight.shape[0], -1) != 0).any(dim=1).sum())


def parameter_rows(module: nn.Module, prefix: str = "", pruned: Iterable[nn.Module] = ()) -> list[LayerCount]:
    """One row per parameter tensor; pruned tensors (``*_orig`` + mask while
    pruning, or the weight of a module in ``pruned``) count their non-zeros; a
    module with ``live_params`` (a column-pruned head) counts what it says; a
    quantised weight adds a row of its per-channel scales."""
    pruned_ids = {id(m) for m in pruned}
    rows = []
    for mod_name, mod in module.named_modules(prefix=prefix):
        binary_names = mod.binary_param_names if isinstance(mod, BinaryModule) else ()
        bits = weight_bits(mod)
        for p_name, p in mod.named_parameters(recurse=False):
            name = p_name.removesuffix("_orig")
            mask = getattr(mod, f"{name}_mask", None)
            is_pruned = mask is not None or (name == "weight" and id(mod) in pruned_ids)
            if hasattr(mod, "live_params"):
                count = mod.live_params(name)
            elif is_pruned and bits and name == "weight":  # a weight rounded to code 0 is as gone as a pruned one
                count = int(quantized_weight(mod)[0].count_nonzero())
            elif mask is not None:
                count = int(mask.count_nonzero())
            elif is_pruned:
                count = int(p.detach().count_nonzero())
            else:
                count = p.numel()
            full = f"{mod_name}.{name}" if mod_name else name
            if name in binary_names:
                rows.append(LayerCount(full, "binary", count))
            elif bits and name == "weight":
                rows.append(LayerCount(full, "quantized", count, bits))
                scales = _live_rows(mod) if is_pruned else p.shape[0]
                rows.append(LayerCount(f"{full}_scale", "fp32", scales))
            else:
                rows.append(LayerCount(full, "fp32", count))
    return rows


def totals(rows: list[LayerCount]) -> tuple[int, int]:
    """(fp32 params, binary params); quantised weights are in neither (:func:`quantized_total`)."""
    fp32 = sum(r.params for r in rows if r.kind == "fp32")
    binary = sum(r.params for r in rows if r.kind == "binary")
    return fp32, binary


def quantized_total(rows: list[LayerCount]) -> int:
    """Weights trained below 32 bits (``adapter.bits``)."""
    return sum(r.params for r in rows if r.kind == "quantized")


def total_bits(rows: list[LayerCount]) -> int:
    """Memory of ``rows`` in bits: each parameter at its width."""
    return sum(r.bits for r in rows)


def size_percent(n_fp32: int, n_bin: int, base_fp32: int, base_bin: int, quantized_bits: int = 0) -> float:
    """Memory of what the task introduces, as a percentage of the base's (``quantized_bits``: the bits
    of weights trained below 32 bits)."""
    return 100.0 * (32 * n_fp32 + n_bin + quantized_bits) / (32 * base_fp32 + base_bin)
