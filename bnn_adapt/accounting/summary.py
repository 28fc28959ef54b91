"""The counts a run reports (``summary.json``, ``metrics.json``) and the per-layer table it prints.

Introduced parameters (adapter + new head) are reported next to the base's,
separately for the adapter and the head too (docs/concepts.md, Size), and shown per layer in
the manner of Larq's ``models.summary``. The thesis's own convention
rides along under ``thesis`` (:mod:`bnn_adapt.accounting.thesis`).
"""

from __future__ import annotations

from torch import nn

from bnn_adapt.accounting.operations import operation_counts
from bnn_adapt.accounting.parameters import parameter_rows, quantized_total, total_bits, totals
from bnn_adapt.accounting.thesis import thesis_counts


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
    base_bits = 32 * base_fp32 + base_bin
    adapter_bits, head_bits = total_bits(adapter_rows), total_bits(head_rows)  # each weight at its real width
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
        **quantized_counts(model, adapter_rows, head_rows),
        "size_pct": 100.0 * (adapter_bits + head_bits) / base_bits,
        "adapter_size_pct": 100.0 * adapter_bits / base_bits,
        "head_size_pct": 100.0 * head_bits / base_bits,
        "base_bits": base_bits,
        "introduced_bits": adapter_bits + head_bits,
        "thesis": thesis_counts(model, pruned),  # the thesis's own convention
    }


def quantized_counts(model: nn.Module, adapter_rows: list, head_rows: list) -> dict:
    """``adapter.bits`` and the weights trained at it (their fp32 scales count with the fp32 params)."""
    adapter, head = quantized_total(adapter_rows), quantized_total(head_rows)
    return {
        "weight_bits": getattr(model, "bits", 32),
        "adapter_quantized_params": adapter,
        "head_quantized_params": head,
        "introduced_quantized_params": adapter + head,
    }


def layer_table(model: nn.Module) -> str:
    """A per-layer table (like Larq's ``models.summary``) of what is introduced."""
    is_adapted = hasattr(model, "introduced_modules")
    introduced = model.introduced_modules() if is_adapted else {"base": [model]}
    named = {id(m): n for n, m in model.named_modules()}
    lines = [f"{'layer':<48} {'part':<8} {'kind':<9} {'params':>12} {'bits':>14}"]
    lines.append("-" * len(lines[0]))
    for part, modules in introduced.items():
        for m in modules:
            for row in parameter_rows(
                m, prefix=named.get(id(m)) or part, pruned=pruned_modules(model) if is_adapted else ()
            ):
                kind = f"{row.width}-bit" if row.kind == "quantized" else row.kind
                lines.append(f"{row.name:<48} {part:<8} {kind:<9} {row.params:>12,} {row.bits:>14,}")
    lines.append("-" * len(lines[0]))
    if not is_adapted:
        fp32, binary = totals(parameter_rows(model))
        lines.append(f"base: {binary:,} binary + {fp32:,} fp32 params ({32 * fp32 + binary:,} bits)")
        return "\n".join(lines)
    s = summarize(model)
    lines.append(
        f"base: {s['base_binary_params']:,} binary + {s['base_fp32_params']:,} fp32 params ({s['base_bits']:,} bits)"
    )
    quantized = [
        f" + {s[k]:,} {s['weight_bits']}-bit" if s[k] else ""
        for k in ("adapter_quantized_params", "head_quantized_params")
    ]
    lines.append(
        f"introduced: adapter {s['adapter_binary_params']:,} binary + {s['adapter_fp32_params']:,} fp32{quantized[0]}, "
        f"head {s['head_binary_params']:,} binary + {s['head_fp32_params']:,} fp32{quantized[1]} -> "
        f"{s['introduced_bits']:,} bits, size {s['size_pct']:.3f}% of the base "
        f"(adapter alone {s['adapter_size_pct']:.3f}%)"
    )
    t = s["thesis"]
    lines.append(
        f"thesis convention: {t['introduced_binary_params']:,} binary + {t['introduced_fp32_params']:,} "
        f"fp32 introduced against a base of {t['base_binary_params']:,} binary + {t['base_fp32_params']:,} fp32 "
        f"-> {t['size_pct']:.3f}%"
    )
    return "\n".join(lines)
