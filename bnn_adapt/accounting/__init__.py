"""Parameter accounting and the size metric (docs/concepts.md, Size)."""

from bnn_adapt.accounting.parameters import (
    LayerCount,
    parameter_rows,
    quantized_total,
    size_percent,
    total_bits,
    totals,
)
from bnn_adapt.accounting.summary import layer_table, summarize

__all__ = [
    "LayerCount",
    "layer_table",
    "parameter_rows",
    "quantized_total",
    "size_percent",
    "summarize",
    "total_bits",
    "totals",
]
