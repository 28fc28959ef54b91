"""Parameter accounting and the size metric (SPEC sections 1.3 and 4).

Binary parameters are those a :class:`~bnn_adapt.binary.BinaryModule` lists;
everything else that is a parameter is fp32 (BN running stats are buffers and
do not count). A pruned tensor counts its non-zeros.

    size % = (32 * n_fp32 + n_bin) / (32 * N_fp32 + N_bin) * 100
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bnn_adapt.binary import BinaryModule


@dataclass
class LayerCount:
    name: str
    kind: str  # "binary" or "fp32"
    params: int

    @property
    def bits(self) -> int:
        return self.params * (1 if self.kind == "binary" else 32)


def parameter_rows(module: nn.Module, prefix: str = "") -> list[LayerCount]:
    """One row per parameter tensor; pruned tensors (``*_orig`` + mask, or
    flagged ``pruned``) count their non-zeros; a module with ``live_params``
    (a column-pruned head) counts what it says."""
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
            elif name in getattr(mod, "pruned_param_names", ()):
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


def summarize(model: nn.Module) -> dict:
    """Counts for an adapted model (see :mod:`bnn_adapt.strategies`)."""
    base_fp32, base_bin = totals(parameter_rows(model.base))
    introduced = model.introduced_modules()
    adapter_rows = [r for m in introduced["adapter"] for r in parameter_rows(m)]
    head_rows = [r for m in introduced["head"] for r in parameter_rows(m)]
    adapter_fp32, adapter_bin = totals(adapter_rows)
    head_fp32, head_bin = totals(head_rows)
    return {
        "strategy": model.strategy,
        "base_binary_params": base_bin,
        "base_fp32_params": base_fp32,
        "adapter_fp32_params": adapter_fp32,
        "adapter_binary_params": adapter_bin,
        "head_fp32_params": head_fp32,
        "head_binary_params": head_bin,
        "introduced_fp32_params": adapter_fp32 + head_fp32,
        "introduced_binary_params": adapter_bin + head_bin,
        "size_pct": size_percent(adapter_fp32 + head_fp32, adapter_bin + head_bin, base_fp32, base_bin),
        "adapter_size_pct": size_percent(adapter_fp32, adapter_bin, base_fp32, base_bin),
        "head_size_pct": size_percent(head_fp32, head_bin, base_fp32, base_bin),
        "base_bits": 32 * base_fp32 + base_bin,
    }


def layer_table(model: nn.Module) -> str:
    """A per-layer table (like Larq's ``models.summary``) of what is introduced."""
    is_adapted = hasattr(model, "introduced_modules")
    introduced = model.introduced_modules() if is_adapted else {"base": [model]}
    named = {id(m): n for n, m in model.named_modules()}
    lines = [f"{'layer':<48} {'part':<8} {'kind':<7} {'params':>12} {'bits':>14}"]
    lines.append("-" * len(lines[0]))
    for part, modules in introduced.items():
        for m in modules:
            for row in parameter_rows(m, prefix=named.get(id(m)) or part):
                lines.append(f"{row.name:<48} {part:<8} {row.kind:<7} {row.params:>12,} {row.bits:>14,}")
    lines.append("-" * len(lines[0]))
    if not is_adapted:
        fp32, binary = totals(parameter_rows(model))
        lines.append(f"base: {binary:,} binary + {fp32:,} fp32 params ({32 * fp32 + binary:,} bits)")
        return "\n".join(lines)
    s = summarize(model)
    lines.append(
        f"base: {s['base_binary_params']:,} binary + {s['base_fp32_params']:,} fp32 params "
        f"({s['base_bits']:,} bits)"
    )
    lines.append(
        f"introduced: adapter {s['adapter_binary_params']:,} binary + {s['adapter_fp32_params']:,} fp32, "
        f"head {s['head_binary_params']:,} binary + {s['head_fp32_params']:,} fp32 -> "
        f"size {s['size_pct']:.3f}% of the base (adapter alone {s['adapter_size_pct']:.3f}%)"
    )
    return "\n".join(lines)
