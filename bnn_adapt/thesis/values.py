"""The numbers the thesis prints, as data: ``thesis_results.csv`` beside this module.

The file names its source. Each sweep's ``table:`` node maps its rows (their swept
overrides, e.g. ``row=serial_g1``) to the thesis's row names (``thesis_rows``); a thesis
table with no mapping is one the thesis prints as an image, whose values are unknown here.
"""

from __future__ import annotations

import csv
import functools
from importlib.resources import files

#: the data file, found through the package (an editable install, or a built one: package data)
THESIS_CSV = files("bnn_adapt.thesis") / "thesis_results.csv"
UNKNOWN = "unknown (an image in the thesis)"
NOT_PRINTED = "not printed"
NOT_IN_THESIS = "no such row in the thesis"


@functools.cache
def thesis_values() -> dict[tuple[str, str], dict[str, float | None]]:
    """Every printed value by (table id, thesis row name); an empty cell ("-" in the thesis) is None."""
    lines = [line for line in THESIS_CSV.read_text().splitlines() if line.strip() and not line.startswith("#")]
    values = {}
    for record in csv.DictReader(lines):
        table, row = record.pop("table"), record.pop("row")
        values[(table, row)] = {k: float(v) if v.strip() else None for k, v in record.items()}
    return values


def printed(table_id: str, thesis_rows: dict[str, str], row_key: str) -> dict[str, float | None] | str:
    """The thesis's values for one of our rows: ``top1_pct``, ``weights`` (introduced, as printed:
    its total, or fp32 + binary where it prints those), ``size_pct``, ``relative_speedup``; or why none."""
    if not thesis_rows:
        return UNKNOWN
    name = thesis_rows.get(row_key)
    if name is None:
        return NOT_IN_THESIS
    value = dict(thesis_values()[(table_id, name)])
    parts = [p for p in (value.get("fp32_weights"), value.get("binary_weights")) if p is not None]
    total = value.get("weights_introduced")
    value["weights"] = total if total is not None else sum(parts) if parts else None
    return value


def printed_finetune_top1(table_id: str) -> float | None:
    """The thesis's finetuning top-1 (%) of table ``table_id``, if it prints one."""
    value = thesis_values().get((table_id, "finetune"))
    return None if value is None else value.get("top1_pct")
