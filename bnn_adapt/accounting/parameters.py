"""Parameter accounting and the size metric (SPEC sections 1.3 and 4).

Binary parameters are those a :class:`~bnn_adapt.binary.BinaryModule` lists;
everything else that is a parameter is fp32 (BN running stats are buffers and
do not count). A pruned tensor counts its non-zeros.

    size % = (32 * n_fp32 + n_bin) / (32 * N_fp32 + N_bin) * 100
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from bnn_adapt.nn.layers import BinaryModule


@dataclass
class LayerCount:
    name: str
    kind: str  # "binary" or "fp32"
    params: int

    @property
    def bits(self) -> int:
        return self.params * (1 if self.kind == "binary" else 32)


def parameter_rows(module: nn.Module, prefix: str = "", pruned: Iterable[nn.Module] = ()) -> list[LayerCount]:
    """One row per parameter tensor; pruned tensors (``*_orig`` + mask while
    pruning, or the weight of a module in ``pruned``) count their non-zeros; a
    module with ``live_params`` (a column-pruned head) counts what it says."""
    pruned_ids = {id(m) for m in pruned}
    rows = []
    for mod_name, mod in module.named_modules(prefix=prefix):
        binary_names = mod.binary_param_names if isinstance(mod, BinaryModule) else ()
        for p_name, p in mod.named_parameters(recurse=False):
            name = p_name.removesuffix("_orig")
            mask = getattr(mod, f"{name}_mask", None)
            if hasattr(mod, "live_params"):
                count = mod.live_params(name)
            elif mask is not None:
                count = int(mask.count_nonzero())
            elif name == "weight" and id(mod) in pruned_ids:
                count = int(p.detach().count_nonzero())
            else:
                count = p.numel()
            kind = "binary" if name in binary_names else "fp32"
            rows.append(LayerCount(f"{mod_name}.{name}" if mod_name else name, kind, count))
    return rows


def totals(rows: list[LayerCount]) -> tuple[int, int]:
    """(fp32 params, binary params)."""
    fp32 = sum(r.params for r in rows if r.kind == "fp32")
    binary = sum(r.params for r in rows if r.kind == "binary")
    return fp32, binary


def size_percent(n_fp32: int, n_bin: int, base_fp32: int, base_bin: int) -> float:
    """Memory of what the task introduces, as a percentage of the base's."""
    return 100.0 * (32 * n_fp32 + n_bin) / (32 * base_fp32 + base_bin)
