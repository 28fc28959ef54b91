"""The counts a run reports (``summary.json``, ``metrics.json``) and the per-layer table it prints.

Introduced parameters (adapter + new head) are reported next to the base's,
separately for the adapter and the head too (SPEC 4), and shown per layer in
the manner of Larq's ``models.summary``.
"""

from __future__ import annotations

from torch import nn

from bnn_adapt.accounting.operations import operation_counts
from bnn_adapt.accounting.parameters import parameter_rows, size_percent, totals


def pruned_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights count their non-zeros: the prune targets of a pruned model."""
    if not getattr(model, "pruned", False):
        return []
    depthwise, pointwise = model.prune_targets()
    return depthwise + pointwise


def summarize(model: nn.Module, image_size: int | None = None) -> dict:
    """Counts for an adapted model (see :mod:`bnn_adapt.adapters`); with ``image_size``
    also its MACs for one image of that size (:mod:`bnn_adapt.accounting.operations`)."""
    base_fp32, base_bin = totals(parameter_rows(model.base))
    introduced, pruned = model.introduced_modules(), pruned_modules(model)
    adapter_rows = [r for m in introduced["adapter"] for r in parameter_rows(m, pruned=pruned)]
    head_rows = [r for m in introduced["head"] for r in parameter_rows(m, pruned=pruned)]
    adapter_fp32, adapter_bin = totals(adapter_rows)
    head_fp32, head_bin = totals(head_rows)
    return {
        "strategy": model.strategy,
        **(operation_counts(model, image_size, pruned) if image_size else {}),
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
            for row in parameter_rows(m, prefix=named.get(id(m)) or part, pruned=pruned_modules(model) if is_adapted else ()):
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
