"""The columns of the thesis tables: ours from the runs' ``metrics.json``, the thesis's as printed, and their difference.

Every adaptation table shows, per row: top-1, weights introduced and % of base
memory in the thesis's convention (``metrics.json`` ``thesis``) beside the
thesis's printed value and the difference; the gap to finetuning in points; the
thesis's relative speed-up ``2 - t / t_finetune`` beside its printed one; then our own
convention and numbers (whole new head, ``t_finetune / t``) in further columns.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bnn_adapt.run.record import RunRecord
from bnn_adapt.thesis.table_runs import Row, Table
from bnn_adapt.thesis.values import NOT_PRINTED, printed, printed_finetune_top1


@dataclass(frozen=True)
class Column:
    """One of our numbers: a value per run (averaged over a row's seeds)."""

    header: str
    value: Callable[[RunRecord], float | int | None]
    fmt: str  # format spec of one value

    def mean(self, row: Row) -> float | None:
        found = values(row, self)
        mean = statistics.fmean(found) if found else None
        return round(mean) if mean is not None and self.fmt == "," else mean

    def render(self, row: Row, seeds: bool) -> tuple[str, dict]:
        found = values(row, self)
        record = {self.header: self.mean(row)}
        if seeds:
            record[self.header + " (std)"] = statistics.stdev(found) if len(found) > 1 else None
        if not found:
            return "-", record
        text = format(self.mean(row), self.fmt)
        if seeds and len(set(found)) > 1:  # counts that do not vary with the seed get no "± 0"
            spread = statistics.stdev(found)
            spec = self.fmt.lstrip("+")  # a spread has no sign
            text += " ± " + format(round(spread) if spec == "," else spread, spec)
        return text, record


def values(row: Row, column: Column) -> list[float]:
    return [float(v) for v in (column.value(m) for m in row.runs) if v is not None]


def pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def thesis_size(m: RunRecord) -> float | None:
    """% of the base's memory in the thesis's convention (:mod:`bnn_adapt.accounting.thesis`)."""
    return m.thesis.size_pct if m.thesis else None


def thesis_weights(m: RunRecord) -> int | None:
    return m.thesis.introduced_weights if m.thesis else None


@dataclass(frozen=True)
class Reference:
    """The finetuning row that gaps and speed-ups are measured against (this table's, or another's)."""

    top1: float | None  # ours, a fraction
    epoch_time_s: float | None
    table_id: str  # whose finetuning row, for the thesis's printed value

    @classmethod
    def of(cls, rows: list[Row], table_id: str) -> Reference | None:
        runs = next((r.runs for r in rows if any(m.strategy == "full_finetune" for m in r.runs)), [])
        top1 = [m.test_top1 for m in runs if m.test_top1 is not None]
        times = [m.epoch_time_s for m in runs if m.epoch_time_s]
        if not top1 and not times:
            return None
        return cls(statistics.fmean(top1) if top1 else None, statistics.fmean(times) if times else None, table_id)


def gap_to_finetune(reference: Reference | None) -> Callable[[RunRecord], float | None]:
    """Points of top-1 below (-) or above (+) finetuning."""
    ref = reference.top1 if reference else None
    return lambda m: None if ref is None or m.test_top1 is None else 100 * (m.test_top1 - ref)


def relative_speedup(reference: Reference | None) -> Callable[[RunRecord], float | None]:
    """The thesis's "relative speed-up": 2 - t / t_finetune (finetuning itself: 1)."""
    ref = reference.epoch_time_s if reference else None
    return lambda m: None if not ref or not m.epoch_time_s else 2 - m.epoch_time_s / ref


def speedup(reference: Reference | None) -> Callable[[RunRecord], float | None]:
    """Ours: t_finetune / t."""
    ref = reference.epoch_time_s if reference else None
    return lambda m: None if not ref or not m.epoch_time_s else ref / m.epoch_time_s


@dataclass(frozen=True)
class ThesisColumn:
    """What the thesis prints for a row (or why it prints nothing)."""

    header: str
    value: Callable[[RunRecord], float | None]  # of the thesis's printed values (thesis_values.printed)
    fmt: str
    table: Table

    def printed(self, row: Row) -> float | None | str:
        found = printed(self.table.id, self.table.thesis_rows, row.key)
        if isinstance(found, str):
            return found
        value = self.value(found)
        return NOT_PRINTED if value is None else value

    def render(self, row: Row, seeds: bool) -> tuple[str, dict]:
        value = self.printed(row)
        if isinstance(value, str):  # why there is no value: the CSV says so too
            return value, {self.header: value}
        return format(round(value) if self.fmt == "," else value, self.fmt), {self.header: value}


@dataclass(frozen=True)
class DeltaColumn:
    """Ours minus the thesis's."""

    header: str
    ours: Column
    thesis: ThesisColumn
    fmt: str

    def render(self, row: Row, seeds: bool) -> tuple[str, dict]:
        ours, theirs = self.ours.mean(row), self.thesis.printed(row)
        if ours is None or theirs is None or isinstance(theirs, str):
            return "-", {self.header: None}
        delta = ours - theirs
        return format(round(delta) if self.fmt == "+," else delta, self.fmt), {self.header: delta}


def comparison_columns(table: Table, reference: Reference | None) -> list:
    """Ours in the thesis's convention beside the thesis's printed values (thesis tables) and the difference."""
    top1 = Column("top-1 %", lambda m: pct(m.test_top1), ".2f")
    gap = Column("gap to finetune (points)", gap_to_finetune(reference), "+.2f")
    weights = Column("weights introduced (thesis conv.)", thesis_weights, ",")
    size = Column("% base memory (thesis conv.)", thesis_size, ".2f")
    relative = Column("speed-up 2 - t/t_ft", relative_speedup(reference), ".2f")
    if not table.thesis:
        return [top1, gap, weights, size, relative]
    finetune = printed_finetune_top1(reference.table_id if reference else table.id)
    printed_top1 = ThesisColumn("thesis top-1 %", lambda v: v.get("top1_pct"), ".2f", table)
    printed_gap = ThesisColumn(
        "thesis gap",
        lambda v: None if finetune is None or v.get("top1_pct") is None else v["top1_pct"] - finetune,
        "+.2f",
        table,
    )
    printed_weights = ThesisColumn("thesis weights", lambda v: v.get("weights"), ",", table)
    printed_size = ThesisColumn("thesis %", lambda v: v.get("size_pct"), ".1f", table)
    printed_speedup = ThesisColumn("thesis speed-up", lambda v: v.get("relative_speedup"), ".2f", table)
    return [
        top1,
        printed_top1,
        DeltaColumn("Δ top-1", top1, printed_top1, "+.2f"),
        gap,
        printed_gap,
        weights,
        printed_weights,
        DeltaColumn("Δ weights", weights, printed_weights, "+,"),
        size,
        printed_size,
        DeltaColumn("Δ %", size, printed_size, "+.2f"),
        relative,
        printed_speedup,
    ]


def our_columns(reference: Reference | None, pruned: bool) -> list[Column]:
    """Our own convention (the whole new head, the full base with its own classifier) and numbers."""
    return [
        Column("best top-1 %", lambda m: pct(m.best_test_top1), ".2f"),
        *([Column("best before pruning %", lambda m: pct(m.best_before_pruning_top1), ".2f")] if pruned else []),
        Column("weights introduced (ours)", lambda m: m.introduced_weights, ","),
        Column("fp32 weights", lambda m: m.introduced_fp32_params, ","),
        Column("binary weights", lambda m: m.introduced_binary_params, ","),
        Column("% base memory (ours)", lambda m: m.size_pct, ".3f"),
        Column("adapter MACs", lambda m: m.adapter_macs, ","),  # per image (bnn_adapt.accounting.operations)
        Column("epoch time (s)", lambda m: m.epoch_time_s, ".2f"),
        Column("speed-up t_ft/t", speedup(reference), ".2f"),
    ]


def unknown_column(header: str, table: Table) -> ThesisColumn:
    """A thesis column of a table the thesis prints as an image: every cell says so."""
    return ThesisColumn(header, lambda v: None, "", table)
