"""The thesis tables and figures, rendered from the runs' own result files (SPEC section 6).

Each table is one Hydra multirun (``sweeps/table_*.yaml``) with a fixed sweep
directory and one run directory per row. To render a table, its sweep definition
is expanded exactly as Hydra's basic sweeper expands it and every row's config is
composed; the row's run directory is where Hydra puts it (``hydra.sweep.dir`` /
``hydra.job.override_dirname``), and its ``metrics.json`` (``summary.json`` for
count-only tables) is the only source of numbers. Rows that never ran, failed or
are unfinished still appear, marked. Each file states the settings its runs used.

    python -m bnn_adapt.tables --profile smoke --out results/smoke            # every thesis table
    python -m bnn_adapt.tables --profile full --out results 6.5 fashion       # some tables
    python -m bnn_adapt.tables --list                                        # table ids and their sweeps

Writes ``table_<id>.md`` and ``.csv`` per table, per-table figures (test accuracy
per epoch, training loss) and ``accuracy_vs_weights.png`` (top-1 against the
weights each strategy introduces, log scale, every adaptation run rendered).
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt import config as _resolvers  # noqa: F401 - registers ${range:...} etc. for composition
from bnn_adapt.report import run_label
from bnn_adapt.results import config_hash, read_json_or_none

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"


# ----------------------------------------------------------------------------- table definitions


@dataclass(frozen=True)
class Table:
    """One thesis table: the sweep that produces its rows and what it shows."""

    id: str  # "6.2"; output files are table_<id with _>.md/.csv
    sweep: str  # sweeps/<sweep>.yaml
    title: str
    kind: str  # "counts" (summary_only), "pretrain" or "adapt"
    speedup_reference: str | None = None  # table whose finetune row times the speed-up, if not this one
    seeds: bool = False  # rows repeated over seeds: cells are mean ± std

    @property
    def stem(self) -> str:
        return "table_" + self.id.replace(".", "_")


THESIS_TABLES = (
    Table("5.2", "table_5_2", "ReActNet-18 vs ResNet-18 (ImageNet): parameters and memory", "counts"),
    Table("6.1", "table_6_1", "STE BNN vs real-valued ResNet-18 on the CIFAR-100 base split (labels 20-99)",
          "pretrain"),
    Table("6.2", "table_6_2", "CIFAR-10 5-5: serial adapters", "adapt"),
    Table("6.3", "table_6_3", "CIFAR-100 80-20: serial adapters after stages 1-3, grouped", "adapt",
          speedup_reference="6.5"),
    Table("6.4", "table_6_4", "CIFAR-100 80-20: UDTA with pruning", "adapt", speedup_reference="6.5"),
    Table("6.5", "table_6_5", "CIFAR-100 80-20: UDTA with grouped convolutions", "adapt"),
    Table("6.6", "table_6_6", "Flowers-102 on ReActNet-18: UDTA with pruning", "adapt"),
    Table("6.7", "table_6_7", "Oxford-IIIT Pets on ReActNet-18: UDTA with pruning", "adapt"),
)  # fmt: skip
EXTRA_TABLES = (
    Table("fashion", "table_fashion", "Fashion-MNIST 5-5 (real data): every strategy, 3 seeds", "adapt", seeds=True),
)
TABLES: dict[str, Table] = {t.id: t for t in (*THESIS_TABLES, *EXTRA_TABLES)}

BASE_LABELS = {
    "ste_resnet_cifar": "STE BNN (BinaryNet ResNet-18, CIFAR)",
    "resnet18_cifar": "ResNet-18, fp32 (CIFAR stem)",
    "reactnet18": "ReActNet-18",
    "resnet18": "ResNet-18, fp32 (torchvision)",
}


# ----------------------------------------------------------------------------- rows and their runs


STALE = "stale"  # finished, but with another config than the sweep's today (code or defaults changed)


@dataclass
class Job:
    """One expected run: its overrides, composed config and run directory, and what it left there."""

    overrides: tuple[str, ...]
    cfg: DictConfig
    run_dir: Path
    result_file: str
    config_hash: str  # what the task will record for this config (bnn_adapt.results.config_hash)

    @functools.cached_property
    def result(self) -> dict | None:
        return read_json_or_none(self.run_dir / self.result_file)

    @property
    def status(self) -> str:
        result = self.result
        if result is None:
            return "incomplete" if self.run_dir.is_dir() else "not run"
        status = result.get("status", "complete")
        return STALE if status == "complete" and result.get("config_hash") != self.config_hash else status

    @property
    def metrics(self) -> dict | None:
        """The run's numbers, also when stale (shown, and marked)."""
        return self.result if self.status in ("complete", STALE) else None


@dataclass
class Row:
    label: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def runs(self) -> list[dict]:
        return [m for m in (j.metrics for j in self.jobs) if m is not None]

    @property
    def status(self) -> str:
        states = [j.status for j in self.jobs]
        if len(states) == 1:
            return states[0]
        counts = {s: states.count(s) for s in dict.fromkeys(states)}
        return ", ".join(f"{n}/{len(states)} {s}" for s, n in counts.items())

    @property
    def error(self) -> str | None:
        for job in self.jobs:
            result = job.result
            if result and result.get("status") == "failed":
                return str(result.get("error", "failed"))
        return None


def _compose(sweep: str, overrides: Sequence[str]) -> DictConfig:
    """A job's full config (Hydra's node included), inside :func:`table_rows`' Hydra context."""
    from hydra import compose

    return compose(
        config_name=sweep, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides], return_hydra_config=True
    )


def expand_sweep(sweep: str, arguments: Sequence[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper builds them from the sweep's
    ``hydra.sweeper.params`` and the command-line ``arguments`` (which replace a param of the same key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    non_sweep = [a for a in arguments if not OverridesParser.create().parse_override(a).is_sweep_override()]
    params = OmegaConf.to_container(_compose(sweep, non_sweep).hydra.sweeper.params) or {}
    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *arguments])
    return BasicSweeper.split_arguments(parsed, None)[0]


def expected_hash(cfg: DictConfig, run_dir: Path) -> str:
    """The config hash the task records when it runs this job: of the config without Hydra's node,
    resolved as inside that job (``paths.output_dir`` is the job's run directory)."""
    from hydra.core.hydra_config import HydraConfig

    from bnn_adapt.task import without_hydra_node

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return config_hash(without_hydra_node(cfg))


def table_rows(table: Table, profile: str, overrides: Sequence[str] = ()) -> list[Row]:
    """The table's rows in sweep order, each with its run(s); seeds of one row are grouped."""
    from hydra import initialize_config_dir

    rows: dict[tuple, Row] = {}
    result_file = "summary.json" if table.kind == "counts" else "metrics.json"
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        for job_overrides in expand_sweep(table.sweep, [f"profile={profile}", *overrides]):
            cfg = _compose(table.sweep, job_overrides)
            run_dir = Path(cfg.hydra.sweep.dir) / cfg.hydra.job.override_dirname
            key = tuple(o for o in job_overrides if not (table.seeds and o.split("=", 1)[0] == "seed"))
            row = rows.setdefault(key, Row(row_label(table, cfg)))
            row.jobs.append(Job(tuple(job_overrides), cfg, run_dir, result_file, expected_hash(cfg, run_dir)))
    return list(rows.values())


def row_label(table: Table, cfg: DictConfig) -> str:
    if table.kind in ("counts", "pretrain"):
        return BASE_LABELS.get(cfg.base.name, cfg.base.name)
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("adapter", "reduction")}
    label = run_label({"config": parts})
    return {"full_finetune": "finetune", "head_only": "head only"}.get(label, label)


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


def _introduced(m: dict) -> int | None:
    fp32, binary = m.get("introduced_fp32_params"), m.get("introduced_binary_params")
    return None if fp32 is None or binary is None else fp32 + binary


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
    Column("weights introduced", _introduced, ","),
    Column("fp32 weights", _get("introduced_fp32_params"), ","),
    Column("binary weights", _get("introduced_binary_params"), ","),
    Column("% base memory", _get("size_pct"), ".3f"),
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_losses(run_dir: Path, metrics: dict) -> tuple[list[float], list[float]]:
    """(steps, losses) from Lightning's CSV log; per-epoch losses from metrics.json if there is none."""
    path = run_dir / "csv" / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as f:
            points = [(float(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(f)
                      if r.get("train/loss_step") and r.get("step")]  # fmt: skip
        if points:
            return [p[0] for p in points], [p[1] for p in points]
    history = [h for h in metrics.get("history", []) if "train/loss_epoch" in h]
    return [h["epoch"] for h in history], [h["train/loss_epoch"] for h in history]


def plot_curves(rendered: Rendered, out: Path) -> list[Path]:
    """Test accuracy per epoch and training-loss curves, one line per run."""
    if rendered.table.kind == "counts":
        return []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    written = []
    for name, ylabel in (("test_accuracy", "test top-1"), ("train_loss", "training loss")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 rows in distinct colours
        for row in rendered.rows:
            for i, job in enumerate(j for j in row.jobs if j.metrics):
                metrics = job.metrics
                if name == "test_accuracy":
                    points = [(h["epoch"] + 1, h["val/acc"]) for h in metrics.get("history", []) if "val/acc" in h]
                    xs, ys = [p[0] for p in points], [p[1] for p in points]
                else:
                    xs, ys = training_losses(job.run_dir, metrics)
                if xs:
                    ax.plot(xs, ys, marker="." if len(xs) < 30 else None, alpha=0.85,
                            label=row.label if i == 0 else None)  # fmt: skip
        ax.set_xlabel("epoch" if name == "test_accuracy" else "training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"Table {rendered.table.id}: {ylabel}", fontsize=10)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{rendered.table.stem}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_accuracy_vs_weights(rendered: list[Rendered], path: Path) -> Path:
    """Top-1 against log(weights introduced), every adaptation run, one panel per dataset."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    points: dict[str, list[tuple[str, float, float, str]]] = {}
    for r in rendered:
        if r.table.kind != "adapt":
            continue
        for row in r.rows:
            for m in row.runs:
                weights, top1 = _introduced(m), m.get("test_top1")
                if weights and top1 is not None:
                    dataset = m["config"]["data"]["name"]
                    points.setdefault(dataset, []).append((m.get("strategy", "?"), weights, top1, r.table.id))
    panels = sorted(points) or ["(no runs yet)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    markers = {"head_only": "s", "full_finetune": "*", "serial": "o", "udta": "^", "lora": "D", "bitfit": "v"}
    # one colour per strategy in every panel
    strategies = list(markers) + sorted({p[0] for ps in points.values() for p in ps} - set(markers))
    colors = {s: plt.cm.tab10.colors[i % 10] for i, s in enumerate(strategies)}
    for ax, dataset in zip(axes[0], panels):
        for strategy in sorted({p[0] for p in points.get(dataset, [])}):
            chosen = [p for p in points[dataset] if p[0] == strategy]
            ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], marker=markers.get(strategy, "x"),
                       color=colors[strategy], label=strategy, alpha=0.8)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
        ax.set_xlabel("weights introduced (log scale)")
        ax.set_ylabel("test top-1 (final)")
        tables = sorted({p[3] for p in points.get(dataset, [])})
        ax.set_title(f"{dataset} (tables {', '.join(tables)})" if tables else dataset, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.collections:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        plot_curves(r, out)
        rendered.append(r)
    others = [Rendered(t, table_rows(t, profile, overrides), "", []) for t in TABLES.values() if t.id not in ids]
    plot_accuracy_vs_weights([*rendered, *others], out / "accuracy_vs_weights.png")  # every table's runs
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.tables", description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="*", help="table ids (default: every thesis table): " + ", ".join(TABLES))
    parser.add_argument("--profile", default="full", help="the profile the sweeps ran with (default full)")
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override the sweeps were also given (their run directories carry it)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the tables and their sweeps")
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
    for r in render_tables(ids, args.profile, Path(args.out), args.override):
        print(f"table {r.table.id}: {r.progress()} -> {Path(args.out) / r.table.stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
