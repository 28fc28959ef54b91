"""The thesis tables and figures, rendered from the runs' own result files (SPEC section 6).

Each table is one Hydra multirun (``sweeps/table_*.yaml``, whose ``table:`` node
describes it) with a fixed sweep directory and one run directory per row
(:mod:`bnn_adapt.tools.table_runs`); the runs' ``metrics.json`` files are the
only source of numbers. Rows that never ran, failed or are unfinished still
appear, marked. Each file states the settings its runs used.

    python -m bnn_adapt.tools.tables --profile smoke --out results/smoke          # render every thesis table
    python -m bnn_adapt.tools.tables --profile full --out results 6.5 fashion     # some tables
    python -m bnn_adapt.tools.tables --run --profile smoke 6.5                    # run its sweeps first (make table)
    python -m bnn_adapt.tools.tables --list                                      # table ids and their sweeps

Writes ``table_<id>.md`` and ``.csv`` per table, per-table figures (test accuracy
per epoch, training loss) and ``accuracy_vs_weights.png`` (top-1 against the
weights each strategy introduces, log scale, every adaptation run rendered).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bnn_adapt.tools.figures import plot_accuracy_vs_weights, plot_curves
from bnn_adapt.tools.table_runs import (
    STALE,
    TABLES,
    THESIS_TABLES,
    Row,
    Table,
    introduced_weights,
    run_sweeps,
    table_rows,
)

# ----------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict], float | int | None]
    fmt: str  # format spec of one value


def _get(key: str) -> Callable[[dict], float | int | None]:
    return lambda m: m.get(key)


def _base_bits(m: dict) -> int | None:
    if m.get("base_fp32_params") is None or m.get("base_binary_params") is None:
        return None
    return 32 * m["base_fp32_params"] + m["base_binary_params"]


COUNT_COLUMNS = (
    Column("fp32 params", _get("base_fp32_params"), ","),
    Column("binary params", _get("base_binary_params"), ","),
    Column("memory (bits)", _base_bits, ","),
    Column("memory (MB)", lambda m: None if _base_bits(m) is None else _base_bits(m) / 8e6, ".2f"),
)
PRETRAIN_COLUMNS = (
    Column("top-1 (final)", _get("test_top1"), ".4f"),
    Column("best top-1", _get("best_test_top1"), ".4f"),
    *COUNT_COLUMNS,
    Column("epoch time (s)", _get("epoch_time_s"), ".2f"),
)
BEST_BEFORE_PRUNING = Column("best before pruning", _get("best_before_pruning_top1"), ".4f")
ADAPT_COLUMNS = (
    Column("top-1 (final)", _get("test_top1"), ".4f"),
    Column("best top-1", _get("best_test_top1"), ".4f"),
    Column("weights introduced", introduced_weights, ","),
    Column("fp32 weights", _get("introduced_fp32_params"), ","),
    Column("binary weights", _get("introduced_binary_params"), ","),
    Column("% base memory", _get("size_pct"), ".3f"),
    Column("adapter MACs", _get("adapter_macs"), ","),  # per image (bnn_adapt.accounting.operations)
    Column("epoch time (s)", _get("epoch_time_s"), ".2f"),
)
SPEEDUP_HEADER = "speed-up vs finetune"


def columns_of(table: Table, rows: list[Row]) -> list[Column]:
    if table.kind == "counts":
        return list(COUNT_COLUMNS)
    if table.kind == "pretrain":
        return list(PRETRAIN_COLUMNS)
    columns = list(ADAPT_COLUMNS)
    if any(job.cfg.reduction.name == "prune" for row in rows for job in row.jobs):
        columns.insert(2, BEST_BEFORE_PRUNING)
    return columns


def values(row: Row, column: Column) -> list[float]:
    return [float(v) for v in (column.value(m) for m in row.runs) if v is not None]


def cell(row: Row, column: Column, seeds: bool) -> str:
    found = values(row, column)
    if not found:
        return "-"
    mean = statistics.fmean(found)
    if column.fmt == ",":
        mean = round(mean)
    text = format(mean, column.fmt)
    if seeds and len(set(found)) > 1:  # counts that do not vary with the seed get no "± 0"
        spread = statistics.stdev(found)
        text += " ± " + format(round(spread) if column.fmt == "," else spread, column.fmt)
    return text


def finetune_epoch_time(rows: list[Row]) -> float | None:
    for row in rows:
        times = [m["epoch_time_s"] for m in row.runs if m.get("strategy") == "full_finetune" and m.get("epoch_time_s")]
        if times:
            return statistics.fmean(times)
    return None


def speedup(row: Row, reference: float | None) -> float | None:
    times = [m["epoch_time_s"] for m in row.runs if m.get("epoch_time_s")]
    return reference / statistics.fmean(times) if reference and times else None


# ----------------------------------------------------------------------------- settings


def settings(rows: list[Row], counts_only: bool = False) -> dict[str, str]:
    """What the runs ran with, from their own configs (the composed config where none finished;
    count-only runs write no config: they train nothing, so profile and width are what matter)."""
    configs = [m["config"] for row in rows for m in row.runs if m.get("config")]
    devices = sorted({str(m["device"]) for row in rows for m in row.runs if m.get("device")})
    source = "the runs' configs"
    if not configs:
        configs = [OmegaConf.to_container(j.cfg, resolve=False) for row in rows for j in row.jobs]
        source = "the sweep definition" + ("" if counts_only else " (no run has finished)")

    def distinct(path: str) -> str:
        found = []
        for c in configs:
            value = OmegaConf.select(OmegaConf.create(c), path, default=None, throw_on_resolution_failure=False)
            if str(value) not in found:
                found.append(str(value))
        return " / ".join(found) if found else "-"

    profile = {"profile": distinct("profile.name")}  # its sizes are listed one by one below
    if counts_only:
        return {**profile, "base width": f"{distinct('base.width')}, counted without data or training",
                "source": source}  # fmt: skip
    return {
        **profile,
        "epochs": distinct("trainer.max_epochs"),
        "seed": distinct("seed"),
        "base.bn": distinct("base.bn"),
        "base width": distinct("base.width"),
        "batch size": distinct("data.batch_size"),
        "training images per class": distinct("data.limit_per_class").replace("None", "all"),
        "device": " / ".join(devices) if devices else f"trainer.accelerator={distinct('trainer.accelerator')}",
        "source": source,
    }


# ----------------------------------------------------------------------------- rendering


@dataclass
class Rendered:
    table: Table
    rows: list[Row]
    markdown: str
    records: list[dict]

    def progress(self) -> str:
        """E.g. ``8 of 11 runs complete, 1 stale``."""
        states = [j.status for row in self.rows for j in row.jobs]
        text = f"{states.count('complete')} of {len(states)} runs complete"
        return text + (f", {states.count(STALE)} {STALE}" if STALE in states else "")


def render(table: Table, rows: list[Row], reference: float | None = None) -> Rendered:
    columns = columns_of(table, rows)
    show_speedup = table.kind == "adapt"
    reference = finetune_epoch_time(rows) or reference
    first = "strategy" if table.kind == "adapt" else "network"
    headers = [first, *(c.header for c in columns), *([SPEEDUP_HEADER] if show_speedup else []), "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    records = []
    for row in rows:
        cells = [cell(row, c, table.seeds) for c in columns]
        record = {first: row.label, "status": row.status, "runs": len(row.runs)}
        for c in columns:
            found = values(row, c)
            mean = statistics.fmean(found) if found else None
            record[c.header] = round(mean) if mean is not None and c.fmt == "," else mean
            if table.seeds:
                record[c.header + " (std)"] = statistics.stdev(found) if len(found) > 1 else None
        if show_speedup:
            ratio = speedup(row, reference)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
            record[SPEEDUP_HEADER] = ratio
        status = row.status
        if row.error:
            status += f": {row.error[:80]}"
        cells.append(status)
        record["run_dirs"] = ";".join(str(j.run_dir) for j in row.jobs)
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
        records.append(record)

    progress = Rendered(table, rows, "", []).progress()
    s = settings(rows, counts_only=table.kind == "counts")
    head = [
        f"# Table {table.id}: {table.title}",
        "",
        f"Settings (from {s.pop('source')}): " + "; ".join(f"{k} {v}" for k, v in s.items()) + ".",
        f"{progress.capitalize()}. Sweep: `python -m bnn_adapt --multirun --config-dir sweeps "
        f"--config-name {table.sweep} profile={rows[0].jobs[0].cfg.profile.name}`; run directories under "
        f"`{rows[0].jobs[0].run_dir.parent}`.",
        "",
    ]
    notes = []
    if show_speedup:
        where = "this table's" if finetune_epoch_time(rows) else f"table {table.speedup_reference}'s"
        notes.append(f"Speed-up: {where} finetune epoch time / the row's (train + eval per epoch).")
    if table.kind == "adapt":
        notes.append("Top-1 (final) is the last epoch's accuracy on the evaluation split: the headline; "
                     "with pruning, best top-1 counts only epochs after pruning.")  # fmt: skip
    if table.seeds:
        notes.append("Cells: mean ± standard deviation over the seeds of each row.")
    if any(j.status == STALE for row in rows for j in row.jobs):
        notes.append(f"{STALE}: the run finished with another config than the sweep's today (code or defaults "
                     "changed since); its numbers are shown, and running the sweep again replaces them.")  # fmt: skip
    markdown = "\n".join([*head, *lines, "", *notes]) + "\n"
    return Rendered(table, rows, markdown, records)


def write_csv(path: Path, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


# ----------------------------------------------------------------------------- figures


# ----------------------------------------------------------------------------- command line


def render_tables(ids: Sequence[str], profile: str, out: Path, overrides: Sequence[str] = ()) -> list[Rendered]:
    """Render the tables ``ids``, their figures, and the accuracy-vs-weights figure of every table's runs."""
    out.mkdir(parents=True, exist_ok=True)
    all_rows = {i: table_rows(TABLES[i], profile, overrides) for i in ids}
    for table_id in ids:  # a speed-up reference from another table
        ref = TABLES[table_id].speedup_reference
        if ref and ref not in all_rows:
            all_rows[ref] = table_rows(TABLES[ref], profile, overrides)
    rendered = []
    for table_id in ids:
        table = TABLES[table_id]
        reference = finetune_epoch_time(all_rows[table.speedup_reference]) if table.speedup_reference else None
        r = render(table, all_rows[table_id], reference)
        (out / f"{table.stem}.md").write_text(r.markdown)
        write_csv(out / f"{table.stem}.csv", r.records)
        plot_curves(table, r.rows, out)
        rendered.append(r)
    others = [(t, table_rows(t, profile, overrides)) for t in TABLES.values() if t.id not in ids]
    plot_accuracy_vs_weights([*((r.table, r.rows) for r in rendered), *others], out / "accuracy_vs_weights.png")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.tables", description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="*", help="table ids (default: every thesis table): " + ", ".join(TABLES))
    parser.add_argument("--profile", default="full", help="the profile the sweeps ran with (default full)")
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override the sweeps were also given (their run directories carry it)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the tables and their sweeps")
    parser.add_argument("--run", action="store_true",
                        help="first run each table's sweeps (bases it needs first; finished runs are skipped)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for t in TABLES.values():
            print(f"{t.id:8} sweeps/{t.sweep}.yaml  {t.title}")
        return 0
    ids = args.tables or [t.id for t in THESIS_TABLES]
    unknown = [i for i in ids if i not in TABLES]
    if unknown:
        print(f"error: unknown table {', '.join(unknown)}; choose from {', '.join(TABLES)}", file=sys.stderr)
        return 2
    if args.run:
        done: set[str] = set()
        for table_id in ids:
            run_sweeps(TABLES[table_id], args.profile, args.override, done)
    for r in render_tables(ids, args.profile, Path(args.out), args.override):
        print(f"table {r.table.id}: {r.progress()} -> {Path(args.out) / r.table.stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
