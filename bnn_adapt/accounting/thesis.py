"""The thesis's own size convention (docs/concepts.md, Size): what the tables of its chapter 6 print.

The thesis measures a task against the base *as deployed for that task*:

* N (the base) = the backbone plus a plain classifier of the base's own kind
  for the target classes (STE: binary linear 320->C with bias + BN1d(C);
  ReActNet: fp32 linear 512->C with bias), never the base's original
  classifier (ReActNet's 1000-class fp32 fc is not in its denominator);
* introduced = the adapter, plus the part of the new classifier beyond a
  plain one: nothing for head-only or UDTA's adapter head, the extra input
  columns of UDTA's concat head; full finetuning introduces a whole new base.

Half-bias convention: the thesis prints *half of the concat head* (Flowers-102
52,275 = (1024 x 102 + 102) / 2), which is the extra columns plus half of the
bias. We count the same: the extra weights plus the bias's share in proportion
to them, rounded down (for Pets' 37 classes 18,944 + 18 = 18,962, as printed).
The exact extra weights alone would be 51 (Flowers-102) or 10 (CIFAR-100)
fewer; ``summarize`` keeps our own convention (the whole new head) beside this.

Not copied: table 6.2 subtracts 1,615 (a 5- vs 10-class head) from
every serial count; table 6.7 divides by the Flowers-102 base.
"""

from __future__ import annotations

from torch import nn

from bnn_adapt.accounting.parameters import (
    LayerCount,
    parameter_rows,
    quantized_total,
    size_percent,
    total_bits,
    totals,
)

#: what ``thesis_counts`` returns, in this order
KEYS = (
    "base_fp32_params",
    "base_binary_params",
    "introduced_fp32_params",
    "introduced_binary_params",
    "size_pct",
    "introduced_quantized_params",
)


def plain_head(model: nn.Module) -> nn.Module:
    """A plain classifier of the base's own kind for the model's target classes."""
    base = model.base
    return base.new_head(base.stage_channels[-1], model.num_classes)


def deployed_base(model: nn.Module) -> tuple[int, int]:
    """(fp32, binary) of N: the backbone (the base without its own classifier) + a plain target classifier."""
    base_fp32, base_bin = totals(parameter_rows(model.base))
    own_fp32, own_bin = totals(parameter_rows(model.base.classifier))
    plain_fp32, plain_bin = totals(parameter_rows(plain_head(model)))
    return base_fp32 - own_fp32 + plain_fp32, base_bin - own_bin + plain_bin


def _linear_rows(rows: list[LayerCount], head: nn.Module) -> tuple[LayerCount | None, LayerCount | None]:
    """(weight, bias) rows of the first linear layer in ``head``'s rows."""
    prefix = next((name for name, m in head.named_modules() if hasattr(m, "in_features")), None)
    if prefix is None:
        return None, None
    dotted = f"{prefix}." if prefix else ""
    found = {r.name[len(dotted) :]: r for r in rows if r.name.startswith(dotted) and "." not in r.name[len(dotted) :]}
    return found.get("weight"), found.get("bias")


def head_beyond_plain(model: nn.Module, pruned=()) -> tuple[int, int, int, int]:
    """(fp32, binary, quantised params, quantised bits) of the new head beyond a plain one, with the bias's
    share of the extra columns. A head trained below 32 bits (``adapter.bits``) has its extra columns at
    that width: they count as quantised weights, the plain head's weights being fp32."""
    new_rows = parameter_rows(model.head, pruned=pruned)
    plain = plain_head(model)
    plain_rows = parameter_rows(plain)
    new_fp32, new_bin = totals(new_rows)
    plain_fp32, plain_bin = totals(plain_rows)
    weight, bias = _linear_rows(new_rows, model.head)
    plain_weight, _ = _linear_rows(plain_rows, plain)
    quantized, quantized_bits = 0, 0
    if weight is not None and weight.kind == "quantized" and plain_weight is not None:
        plain_fp32 -= plain_weight.params  # the plain weights sit among the new head's quantised ones
        quantized = max(0, weight.params - plain_weight.params)
        quantized_bits = quantized * weight.width
    extra = {"fp32": max(0, new_fp32 - plain_fp32), "binary": max(0, new_bin - plain_bin)}
    if weight is not None and bias is not None and plain_weight is not None and weight.params > plain_weight.params:
        extra[bias.kind] += bias.params * (weight.params - plain_weight.params) // weight.params
    return extra["fp32"], extra["binary"], quantized, quantized_bits


def thesis_counts(model: nn.Module, pruned=()) -> dict:
    """The thesis's N, introduced counts and size % for an adapted model (``pruned``: modules
    whose weights count their non-zeros, as in :func:`bnn_adapt.accounting.summarize`). Weights
    trained below 32 bits count at their width in ``size_pct``."""
    n_fp32, n_bin = deployed_base(model)
    quantized, quantized_bits = 0, 0
    if getattr(model, "trains_base", False):  # full finetuning: a whole new base for the task
        fp32, binary = n_fp32, n_bin
    else:
        adapter = [r for m in model.introduced_modules()["adapter"] for r in parameter_rows(m, pruned=pruned)]
        adapter_fp32, adapter_bin = totals(adapter)
        head_fp32, head_bin, head_q, head_q_bits = head_beyond_plain(model, pruned)
        fp32, binary = adapter_fp32 + head_fp32, adapter_bin + head_bin
        adapter_q = [r for r in adapter if r.kind == "quantized"]
        quantized = quantized_total(adapter_q) + head_q
        quantized_bits = total_bits(adapter_q) + head_q_bits
    values = (n_fp32, n_bin, fp32, binary, size_percent(fp32, binary, n_fp32, n_bin, quantized_bits), quantized)
    return dict(zip(KEYS, values, strict=True))
