"""The thesis tables and figures, rendered from the runs' own result files (thesis ch. 6).

Each table is one Hydra multirun (``sweeps/table_*.yaml``, whose ``table:`` node
describes it) with a fixed sweep directory and one run directory per row
(:mod:`bnn_adapt.thesis.table_runs`); the runs' ``metrics.json`` files are the
only source of numbers. Rows that never ran, failed or are unfinished still
appear, marked. Each file states the settings its runs used.

    python -m bnn_adapt.thesis.tables --profile smoke --out results/smoke          # render every thesis table
    python -m bnn_adapt.thesis.tables --profile full --out results 6.5 fashion     # some tables
    python -m bnn_adapt.thesis.tables --run --profile smoke 6.5                    # run its sweeps first (make table)
    python -m bnn_adapt.thesis.tables --list                                      # table ids and their sweeps
    python -m bnn_adapt.thesis.tables --plan --profile full                       # what a reproduction runs, how long

Writes ``table_<id>.md`` and ``.csv`` per table, per-table figures (test accuracy
per epoch, training loss) and ``accuracy_vs_weights.png`` (top-1 against the
weights each strategy introduces, log scale, every adaptation run rendered).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bnn_adapt.run.record import RunRecord
from bnn_adapt.thesis.claims import check_claims, claims_markdown
from bnn_adapt.thesis.columns import Column, Reference, comparison_columns, our_columns, pct, unknown_column
from bnn_adapt.thesis.figures import plot_accuracy_vs_weights, plot_curves
from bnn_adapt.thesis.plan import describe, plan_tables
from bnn_adapt.thesis.table_runs import STALE, TABLES, THESIS_TABLES, Row, Table, run_sweeps, table_rows

# ----------------------------------------------------------------------------- columns


def _base_bits(m: RunRecord) -> int | None:
    if m.base_fp32_params is None or m.base_binary_params is None:
        return None
    return 32 * m.base_fp32_params + m.base_binary_params


COUNT_COLUMNS = (
    Column("fp32 params", lambda m: m.base_fp32_params, ","),
    Column("binary params", lambda m: m.base_binary_params, ","),
    Column("memory (bits)", _base_bits, ","),
    Column("memory (MB)", lambda m: None if _base_bits(m) is None else _base_bits(m) / 8e6, ".2f"),
)
PRETRAIN_COLUMNS = (
    Column("top-1 % (final)", lambda m: pct(m.test_top1), ".2f"),
    Column("best top-1 %", lambda m: pct(m.best_test_top1), ".2f"),
    Column("best epoch", lambda m: None if m.best_epoch is None else m.best_epoch + 1, ","),
    *COUNT_COLUMNS,
    Column("epoch time (s)", lambda m: m.epoch_time_s, ".2f"),
)
PROTOCOLS = ("thesis", "clean")  # conf/protocol/
QUANTIZED = Column(
    "weights below 32 bits", lambda m: m.introduced_quantized_params, ","
)  # fp32 weights: with their scales


def columns_of(table: Table, rows: list[Row], reference: Reference | None) -> list:
    if table.kind == "adapt":
        pruned = any(job.cfg.reduction.name.startswith("prune") for row in rows for job in row.jobs)
        columns = [*comparison_columns(table, reference), *our_columns(reference, pruned)]
        if any(m.introduced_quantized_params for row in rows for m in row.runs):  # adapter.bits below 32
            columns.insert(next(i for i, c in enumerate(columns) if c.header == "binary weights") + 1, QUANTIZED)
        return columns
    columns = list(COUNT_COLUMNS if table.kind == "counts" else PRETRAIN_COLUMNS)
    if table.thesis:  # tables 5.1/6.1 and 5.2: images in the thesis text
        columns.append(unknown_column("thesis's values", table))
    return columns


# ----------------------------------------------------------------------------- settings


def settings(rows: list[Row], counts_only: bool = False) -> dict[str, str]:
    """What the runs ran with, from their own configs (the composed config where none finished;
    count-only runs write no config: they train nothing, so profile and width are what matter)."""
    configs = [m.config for row in rows for m in row.runs if m.config]
    devices = sorted({str(m.device) for row in rows for m in row.runs if m.device})
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
        return {
            **profile,
            "base width": f"{distinct('base.width')}, counted without data or training",
            "source": source,
        }
    adapting = any(c.get("task") == "adapt" for c in configs)
    protocol = {"protocol": protocol_of(distinct("protocol.name"), distinct("protocol.description"), adapting)}
    return {
        **profile,
        **protocol,
        "epochs": distinct("trainer.max_epochs"),
        "seed": distinct("seed"),
        **(
            {"base.bn": distinct("base.bn"), "base.epoch": distinct("base.epoch").replace("None", "last")}
            if adapting
            else {}
        ),
        "base width": distinct("base.width"),
        "batch size": distinct("data.batch_size"),
        "training images per class": distinct("data.limit_per_class").replace("None", "all"),
        "device": " / ".join(devices) if devices else f"trainer.accelerator={distinct('trainer.accelerator')}",
        "source": source,
    }


def protocol_of(name: str, description: str, adapting: bool) -> str:
    """The settings line's protocol: which one ran (conf/protocol/), or why none applies."""
    if not adapting:
        return "none (base pretraining: every protocol adapts these bases)"
    if name == "None":
        return "none chosen (base.bn and base.epoch below)"
    return f"{name} ({description})"


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


def render(table: Table, rows: list[Row], reference: Reference | None = None) -> Rendered:
    """``reference``: another table's finetuning row, for a table without one (6.3 and 6.4 use 6.5's)."""
    own = Reference.of(rows, table.id)
    reference = own or reference
    columns = columns_of(table, rows, reference)
    first = "strategy" if table.kind == "adapt" else "network"
    headers = [first, *(c.header for c in columns), "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    records = []
    for row in rows:
        cells, record = [], {first: row.label, "status": row.status, "runs": len(row.runs)}
        for c in columns:
            text, found = c.render(row, table.seeds)
            cells.append(text)
            record.update(found)
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
        f"--config-name {table.sweep} {' '.join(sweep_arguments(table, rows[0]))}`; run directories under "
        f"`{rows[0].jobs[0].run_dir.parent}`.",
        "",
    ]
    notes = []
    if table.kind == "adapt":
        notes += adapt_notes(table, own is not None)
    if QUANTIZED in columns:
        notes.append(
            "Below 32 bits (adapter.bits), fp32 weights include one fp32 scale per output channel of the "
            "quantised weights, and % base memory counts every weight at its width."
        )
    if table.seeds:
        notes.append("Cells: mean ± standard deviation over the seeds of each row.")
    if any(j.status == STALE for row in rows for j in row.jobs):
        notes.append(
            f"{STALE}: the run finished with another config than the sweep's today (code or defaults "
            "changed since); its numbers are shown, and running the sweep again replaces them."
        )
    markdown = "\n".join([*head, *lines, "", *notes]) + "\n"
    return Rendered(table, rows, markdown, records)


def sweep_arguments(table: Table, row: Row) -> list[str]:
    """What the sweep ran with beyond its own rows (profile, protocol=clean, extra overrides)."""
    swept = set(row.key.split(","))
    seeds = ("seed",) if table.seeds else ()
    return [o for o in row.jobs[0].overrides if o not in swept and o.split("=", 1)[0] not in seeds]


def adapt_notes(table: Table, own_finetune: bool) -> list[str]:
    where = f"table {table.speedup_reference}'s" if table.speedup_reference and not own_finetune else "this table's"
    notes = [
        (
            "Top-1 % is the last epoch's accuracy on the evaluation split: the headline; with pruning, best top-1 "
            f"counts only epochs after pruning. Gap to finetune: points above (+) or below (-) {where} finetuning row."
        ),
        (
            "Thesis convention (`metrics.json` `thesis`): % of the base as deployed for the task (backbone + a "
            "plain target classifier of its kind); weights introduced = the adapter + the new head beyond a plain one "
            "(the concat head's extra columns and their share of its bias, as the thesis printed half of that head; "
            "finetuning: a whole base, 100 %). Ours: the whole new head, against the base with its own classifier."
        ),
        (
            f"Speed-up: the thesis's relative speed-up 2 - t/t_ft and ours t_ft/t, t = mean epoch time "
            f"(train + eval), t_ft = {where} finetuning's."
        ),
    ]
    if table.thesis and table.thesis_rows:
        notes.append(
            "Thesis columns: its printed values (`bnn_adapt/thesis/thesis_results.csv`); Δ = ours - the "
            'thesis\'s; "not printed": the thesis leaves that cell empty.'
        )
    elif table.thesis:
        notes.append("The thesis prints this table as an image: its values are unknown here.")
    if table.thesis_note:
        notes.append(table.thesis_note)
    return notes


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
        ref = table.speedup_reference
        reference = Reference.of(all_rows[ref], ref) if ref else None
        r = render(table, all_rows[table_id], reference)
        (out / f"{table.stem}.md").write_text(r.markdown)
        write_csv(out / f"{table.stem}.csv", r.records)
        plot_curves(table, r.rows, out)
        rendered.append(r)
    done = {r.table.id: r.rows for r in rendered}  # every table in TABLES's order, whichever were rendered now
    every = [(t, done[t.id] if t.id in done else table_rows(t, profile, overrides)) for t in TABLES.values()]
    plot_accuracy_vs_weights(every, out / "accuracy_vs_weights.png")
    write_claims(every, out / "claims.md")
    return rendered


def write_claims(tables: list[tuple[Table, list[Row]]], path: Path) -> None:
    """``claims.md``: the thesis's conclusions checked against every adaptation table's runs."""
    rows_of = dict((t.id, rows) for t, rows in tables)
    checked = []
    for table, rows in tables:
        if table.kind != "adapt":
            continue
        ref = table.speedup_reference
        other = Reference.of(rows_of[ref], ref) if ref in rows_of else None
        checked.append((table, rows, Reference.of(rows, table.id) or other))
    runs = [row for _, rows, _ in checked for row in rows if row.runs]
    s = settings(runs) if runs else {"source": "no finished run"}
    source = s.pop("source")
    line = f"From the tables' runs ({source}): " + "; ".join(f"{k} {v}" for k, v in s.items()) + "."
    path.write_text(claims_markdown(check_claims(checked), line))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.thesis.tables", description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="*", help="table ids (default: every thesis table): " + ", ".join(TABLES))
    parser.add_argument("--profile", default="full", help="the profile the sweeps ran with (default full)")
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override the sweeps were also given (their run directories carry it)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="thesis",
        help="how bases are adapted: thesis (default: best base epoch, BN drifts) or clean (frozen "
        "BN, last epoch; adaptation runs in directories of their own)",
    )
    parser.add_argument("--list", action="store_true", help="list the tables and their sweeps")
    parser.add_argument(
        "--run",
        action="store_true",
        help="first run each table's sweeps (bases it needs first; finished runs are skipped)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print every run the tables need, which are complete and the estimated time of the "
        "rest (bnn_adapt.thesis.plan); runs and renders nothing",
    )
    args = parser.parse_args(argv)
    if args.protocol != "thesis":  # the table sweeps' default protocol names no directory
        args.override.append(f"protocol={args.protocol}")
    if args.list:
        for t in TABLES.values():
            print(f"{t.id:8} sweeps/{t.sweep}.yaml  {t.title}")
        return 0
    ids = args.tables or [t.id for t in THESIS_TABLES]
    unknown = [i for i in ids if i not in TABLES]
    if unknown:
        print(f"error: unknown table {', '.join(unknown)}; choose from {', '.join(TABLES)}", file=sys.stderr)
        return 2
    if args.plan:
        print(describe(plan_tables(ids, args.profile, args.override), args.profile))
        return 0
    if args.run:
        done: set[str] = set()
        for table_id in ids:
            run_sweeps(TABLES[table_id], args.profile, args.override, done)
    for r in render_tables(ids, args.profile, Path(args.out), args.override):
        print(f"table {r.table.id}: {r.progress()} -> {Path(args.out) / r.table.stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
