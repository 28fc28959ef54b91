"""The thesis's conclusions, checked against the runs: ``claims.md`` beside the rendered tables.

Each claim is checked per adaptation table, from the runs' own ``metrics.json``
(the same rows the tables show), and says holds / does not hold / not enough
runs, with the numbers and the rule used. The verdict on a claim is over the
thesis's tables; other tables (the real-data Fashion-MNIST one) are reported
beside it, apart. Sizes are in the thesis's convention (docs/concepts.md, Size), speed-ups by
its formula ``2 - t / t_finetune``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bnn_adapt.run.record import RunRecord
from bnn_adapt.thesis.columns import Reference, relative_speedup, thesis_size, thesis_weights
from bnn_adapt.thesis.table_runs import Row, Table

HOLDS, FAILS, TOO_FEW = "holds", "does not hold", "not enough runs"
ADAPTER_FREE = ("full_finetune", "head_only")  # the two reference rows of every table


@dataclass
class Finding:
    table: Table
    verdict: str
    numbers: str


@dataclass
class Claim:
    title: str
    rule: str
    findings: list[Finding] = field(default_factory=list)

    def verdict(self, thesis: bool) -> str:
        found = [f.verdict for f in self.findings if f.table.thesis == thesis and f.verdict != TOO_FEW]
        return TOO_FEW if not found else FAILS if FAILS in found else HOLDS


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def row_mean(row: Row, value: Callable[[RunRecord], float | None]) -> float | None:
    return mean([v for v in (value(m) for m in row.runs) if v is not None])


def strategy(row: Row) -> str | None:
    return next((m.strategy for m in row.runs), None)


def top1_pct(m: RunRecord) -> float | None:
    return None if m.test_top1 is None else 100 * m.test_top1


def adapters(rows: list[Row]) -> list[Row]:
    """Rows with finished runs of an adapter (not finetuning, not a head alone)."""
    return [r for r in rows if r.runs and strategy(r) not in ADAPTER_FREE]


def gaps(rows: list[Row], reference: Reference | None) -> list[tuple[Row, float]]:
    """(row, points below finetuning) of every adapter row."""
    if reference is None or reference.top1 is None:
        return []
    return [
        (r, 100 * reference.top1 - row_mean(r, top1_pct)) for r in adapters(rows) if row_mean(r, top1_pct) is not None
    ]


def within_finetuning(rows: list[Row], reference: Reference | None) -> tuple[str, str]:
    found = gaps(rows, reference)
    if not found:
        return TOO_FEW, "no finetuning row or no adapter row finished"
    best_row, best = min(found, key=lambda p: p[1])
    within = sum(g <= 5 for _, g in found)
    numbers = (
        f"finetuning {100 * reference.top1:.2f} %; best adapter {best_row.label} {best:+.2f} points below; "
        f"{within} of {len(found)} adapters within 5 points (gaps {min(g for _, g in found):+.2f} .. "
        f"{max(g for _, g in found):+.2f})"
    )
    return (HOLDS if best <= 5 else FAILS), numbers


def small_adapter_cost(rows: list[Row], reference: Reference | None) -> tuple[str, str]:
    found = [
        (r, g, row_mean(r, thesis_size))
        for r, g in gaps(rows, reference)
        if 8 <= (row_mean(r, thesis_size) or -1) <= 11
    ]
    if not found:
        return TOO_FEW, "no finished adapter of 8-11 % of the base" + ("" if reference else " (or no finetuning row)")
    in_band = sum(2.5 <= g <= 4 for _, g, _ in found)
    numbers = "; ".join(f"{r.label} ({s:.1f} %): {g:+.2f} points below finetuning" for r, g, s in found)
    numbers += f"; {in_band} of {len(found)} in the 2.5-4 band"
    return (HOLDS if all(g <= 4 for _, g, _ in found) else FAILS), numbers


MIN_WEIGHT_SPAN = 3.0  # the largest adapter of a log fit at least this many times the smallest


def log_fit(rows: list[Row]) -> tuple[str, str]:
    points = [(row_mean(r, thesis_weights), row_mean(r, top1_pct)) for r in adapters(rows)]
    points = [(w, a) for w, a in points if w and w > 0 and a is not None]
    if len({w for w, _ in points}) < 3:
        return TOO_FEW, f"{len(points)} adapter rows with weights introduced > 0 (3 sizes needed)"
    span = max(w for w, _ in points) / min(w for w, _ in points)
    if span < MIN_WEIGHT_SPAN:  # a slope fitted over a narrow range is an extrapolation, not a trend
        return TOO_FEW, (
            f"{len(points)} adapters whose weights introduced span {span:.2f}x ({MIN_WEIGHT_SPAN:g}x needed)"
        )
    xs, ys = [math.log(w) for w, _ in points], [a for _, a in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    total = sum((y - my) ** 2 for y in ys)
    r2 = 1 - residual / total if total > 0 else 0.0
    numbers = (
        f"{len(points)} adapters: top-1 % = {my - slope * mx:.2f} + {slope:.3f} ln(weights), "
        f"{slope * math.log(10):+.2f} points per 10x weights, R² = {r2:.3f}"
    )
    return (HOLDS if slope > 0 and r2 >= 0.5 else FAILS), numbers


def epochs_to_95(m: RunRecord) -> int | None:
    """The first epoch (1-based) whose test top-1 reaches 95 % of the final one."""
    accs = [top1 for _, top1 in m.epoch_top1()]
    if not accs or m.test_top1 is None:
        return None
    return next(i + 1 for i, a in enumerate(accs) if a >= 0.95 * m.test_top1)


def best_epoch(m: RunRecord) -> int | None:
    """The epoch (1-based) of the best test top-1."""
    accs = [top1 for _, top1 in m.epoch_top1()]
    return accs.index(max(accs)) + 1 if accs else None


def udta_groups_converge(rows: list[Row]) -> tuple[str, str]:
    grouped = [
        r for r in rows if strategy(r) == "udta" and any(m.config["adapter"].get("groups") is not None for m in r.runs)
    ]
    if not grouped:
        return TOO_FEW, "no finished UDTA run with grouped convolutions"
    epochs = max(m.config["trainer"]["max_epochs"] for r in grouped for m in r.runs)
    parts, latest = [], 0
    for row in grouped:  # over a row's seeds: the latest
        reached = [e for e in map(epochs_to_95, row.runs) if e]
        bests = [e for e in map(best_epoch, row.runs) if e]
        if reached:
            parts.append(f"{row.label} {max(reached)} (best at {max(bests)})")
            latest = max(latest, *reached)
    numbers = f"epoch reaching 95 % of the final top-1, of {epochs}: " + "; ".join(parts)
    if epochs <= 10:
        return TOO_FEW, numbers + f" (runs of {epochs} epochs cannot tell)"
    return (FAILS if latest > 10 else HOLDS), numbers


def adapter_speedup(rows: list[Row], reference: Reference | None) -> tuple[str, str]:
    relative = relative_speedup(reference)
    found = [(r, row_mean(r, relative)) for r in adapters(rows)]
    found = [(r, s) for r, s in found if s is not None]
    if not found:
        return TOO_FEW, "no finetuning epoch time or no adapter row finished"
    values = [s for _, s in found]
    median = statistics.median(values)
    numbers = f"{len(values)} adapters: {min(values):.2f} .. {max(values):.2f}, median {median:.2f}"
    return (HOLDS if 1.3 <= median <= 1.45 else FAILS), numbers


def check_claims(tables: list[tuple[Table, list[Row], Reference | None]]) -> list[Claim]:
    """Every claim over ``(table, rows, finetuning reference)`` of the adaptation tables."""
    claims = [
        (
            Claim(
                "Adapters come within 1-5 points of finetuning",
                "the best adapter of a table is at most 5 points below its finetuning row",
            ),
            lambda rows, ref: within_finetuning(rows, ref),
        ),
        (
            Claim(
                "An adapter of 8-11 % of the base's memory costs 2.5-4 points",
                "every adapter of 8-11 % (thesis convention) is at most 4 points below finetuning",
            ),
            lambda rows, ref: small_adapter_cost(rows, ref),
        ),
        (
            Claim(
                "Accuracy grows with log(weights introduced)",
                "least squares top-1 % = a + b ln(weights introduced, thesis convention) over a table's adapters "
                f"(3 sizes or more, spanning {MIN_WEIGHT_SPAN:g}x or more): b > 0 and R² >= 0.5",
            ),
            lambda rows, ref: log_fit(rows),
        ),
        (
            Claim(
                "UDTA with groups reaches its best within about 10 epochs",
                "every UDTA run with grouped convolutions reaches 95 % of its final top-1 by epoch 10",
            ),
            lambda rows, ref: udta_groups_converge(rows),
        ),
        (
            Claim(
                "Adapter epochs are 1.3-1.45x faster than finetuning (relative speed-up 2 - t/t_ft)",
                "the median relative speed-up of a table's adapters lies in [1.30, 1.45]",
            ),
            lambda rows, ref: adapter_speedup(rows, ref),
        ),
    ]
    for claim, check in claims:
        for table, rows, reference in tables:
            verdict, numbers = check(rows, reference)
            claim.findings.append(Finding(table, verdict, numbers))
    return [claim for claim, _ in claims]


def claims_markdown(claims: list[Claim], settings: str) -> str:
    lines = [
        "# The thesis's conclusions, checked against the runs",
        "",
        settings,
        "",
        "| claim | thesis tables | other tables |",
        "|---|---|---|",
    ]
    lines += [f"| {c.title} | {c.verdict(True)} | {c.verdict(False)} |" for c in claims]
    for claim in claims:
        lines += [
            "",
            f"## {claim.title}: {claim.verdict(True)}",
            "",
            f"Rule: {claim.rule}.",
            "",
            "| table | verdict | numbers |",
            "|---|---|---|",
        ]
        for f in claim.findings:
            name = f.table.id if f.table.thesis else f"{f.table.id} (not a thesis table)"
            lines.append(f"| {name} | {f.verdict} | {f.numbers} |")
    return "\n".join(lines) + "\n"
