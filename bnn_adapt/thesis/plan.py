"""Plan a reproduction before running it (``make reproduce-tables PLAN=1``, ``tables --plan``).

Lists every run the tables need (the sweeps in each table's ``needs`` first, each once, as
``tables --run`` runs them), says which are already complete, and estimates how long the
rest take from epoch times measured on this machine, naming the source of each estimate:

* ``measured``: a complete run: its own time (``epoch_time_s`` x epochs run, metrics.json);
* ``like N runs``: the mean ``epoch_time_s`` of finished runs of the same kind (task and
  strategy, tap cache, memory mode, base and width, dataset, its limits and batch size,
  device) x this run's epochs; else, from runs of its kind on another dataset, their mean
  time per training image (their validation included) x this run's training images per
  epoch (counted from the dataset on disk) x epochs;
* ``bench``: the bench's epoch record of its strategy on this kind of device
  (``benchmarks/epochs.json``, ``make bench``; STE base only, pretraining counted as full
  finetuning): seconds per training image x this run's training images per epoch (counted
  from the dataset on disk) x (width / the record's width)^2 x epochs -- rough: only the
  convolutions grow with the square of the width;
* ``no estimate``: none of these; the table's time is then a lower bound.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bnn_adapt.errors import UserError
from bnn_adapt.run.config import REPO_ROOT
from bnn_adapt.thesis.table_runs import STALE, TABLES, Table, table_rows

BENCH_EPOCHS = REPO_ROOT / "benchmarks" / "epochs.json"  # written by make bench (benchmarks.bench_epoch)


@dataclass
class PlannedRun:
    sweep: str
    label: str
    run_dir: Path
    status: str  # as the tables show it: complete, stale, failed, incomplete, not run
    epochs: int
    seconds: float | None  # measured (complete) or estimated; None: no estimate
    source: str

    @property
    def done(self) -> bool:
        return self.status == "complete"


@dataclass
class TablePlan:
    table: Table
    runs: list[PlannedRun] = field(default_factory=list)  # its needs first (those no earlier table listed)
    listed_before: list[str] = field(default_factory=list)  # needs an earlier table of the plan lists

    @property
    def remaining_s(self) -> float:
        return sum(r.seconds or 0.0 for r in self.runs if not r.done)

    @property
    def unknown(self) -> int:
        return sum(1 for r in self.runs if not r.done and r.seconds is None)


def _select(node, path: str):
    """``path`` in a composed config (DictConfig) or a run's resolved config (dict)."""
    if isinstance(node, DictConfig):
        return OmegaConf.select(node, path, default=None)
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def device_kind(name: str) -> str:
    return "cuda" if str(name).startswith(("cuda", "gpu")) else "cpu"


def planned_device(cfg: DictConfig) -> str:
    """Where a run of ``cfg`` would train on this machine (``trainer.accelerator``)."""
    accelerator = str(_select(cfg, "trainer.accelerator"))
    return "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"


DATA_KEYS = ("data.name", "data.limit_per_class", "data.eval_limit_per_class")  # what sets the epoch's images


def run_kind(config, device: str, with_data: bool = True) -> tuple:
    """What a run's epoch time depends on: runs of one kind take about as long per epoch
    (``with_data=False``: as long per training image, on any dataset)."""
    task = _select(config, "task")
    strategy = "pretrain" if task == "pretrain" else _select(config, "adapter.name")
    keys = (
        "tap_cache.enabled",
        "memory",
        "base.name",
        "base.width",
        "data.image_size",
        "data.batch_size",
        "trainer.limit_train_batches",
        "trainer.limit_val_batches",
        "trainer.precision",
        *(DATA_KEYS if with_data else ()),
    )
    return (strategy, *(str(_select(config, k)) for k in keys), device)


@dataclass
class Measured:
    """Finished runs' epoch times by kind, and seconds per training image by kind on any dataset."""

    per_epoch: dict[tuple, list[float]] = field(default_factory=dict)
    per_image: dict[tuple, list[float]] = field(default_factory=dict)


def measured_epochs(tables: Sequence[tuple[Table, list]]) -> Measured:
    """Epoch times of every finished run (complete or stale) of the planned tables."""
    found = Measured()
    for _, rows in tables:
        for row in rows:
            for job in row.jobs:
                m = job.metrics
                if not (m and m.epoch_time_s and m.config):
                    continue
                device = device_kind(m.device)
                found.per_epoch.setdefault(run_kind(m.config, device), []).append(m.epoch_time_s)
                images = training_images(OmegaConf.create(m.config))
                if images:
                    found.per_image.setdefault(run_kind(m.config, device, with_data=False), []).append(
                        m.epoch_time_s / images
                    )
    return found


def read_bench(path: Path) -> list[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []


@functools.cache
def _counted_images(data_yaml: str, split: str) -> int | None:
    from bnn_adapt.run import builders

    datamodule = builders.build_datamodule(OmegaConf.create({"data": OmegaConf.create(data_yaml)}), split)
    try:
        datamodule.setup()
    except UserError:  # not on disk (yet)
        return None
    return len(datamodule.train_set)


def training_images(cfg: DictConfig) -> int | None:
    """Training images per epoch of ``cfg``: the served classes on disk, then ``trainer.limit_train_batches``."""
    split = "base" if cfg.task == "pretrain" else "target"
    n = _counted_images(OmegaConf.to_yaml(cfg.data, resolve=True), split)
    if n is None:
        return None
    batch, limit = int(cfg.data.batch_size), cfg.trainer.limit_train_batches
    batches = math.ceil(n / batch)
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * float(limit))  # Lightning's rule
    return min(n, batches * batch)


def bench_estimate(cfg: DictConfig, device: str, bench: list[dict]) -> tuple[float, str] | None:
    """Seconds per epoch of ``cfg`` from the bench's epoch record of its strategy, and the source line."""
    strategy = "full_finetune" if cfg.task == "pretrain" else cfg.adapter.name
    cached = bool(cfg.task == "adapt" and cfg.tap_cache.enabled)
    found = [
        r
        for r in bench
        if r.get("kind") == "epoch"
        and r.get("model") == _select(cfg, "base.name")
        and (r["strategy"], r["cache_taps"]) == (strategy, cached)
        and device_kind(r.get("device", "cpu")) == device
    ]
    if not found:
        return None
    images = training_images(cfg)
    if images is None:
        return None
    r = found[0]
    scale = (float(cfg.base.width) / r["width"]) ** 2
    per_epoch = r["epoch_time_s"] / r["train_images"] * images * scale
    source = (
        f"bench: {strategy}{' + tap cache' if cached else ''} epoch record ({r['images_per_s']:,.0f} images/s "
        f"at width {r['width']:g}, {r.get('device', 'cpu')}) x {images:,} images x (width ratio)^2 {scale:.3g}"
    )
    return per_epoch, source


def estimate(job, measured: Measured, bench: list[dict]) -> tuple[float | None, str]:
    """(seconds, source) of one expected run."""
    cfg, m = job.cfg, job.metrics
    if job.status == "complete":
        if m.epoch_time_s and m.epochs_run:
            return m.epoch_time_s * m.epochs_run, f"measured ({m.epochs_run} epochs)"
        return None, "complete (no epoch time recorded)"
    if cfg.get("summary_only"):
        return 0.0, "counts only (no training)"
    epochs = int(cfg.trainer.max_epochs)
    device = planned_device(cfg)
    same = measured.per_epoch.get(run_kind(cfg, device))
    if same:
        return epochs * sum(same) / len(same), f"like {len(same)} finished run(s) of its kind ({device})"
    alike = measured.per_image.get(run_kind(cfg, device, with_data=False))
    images = training_images(cfg) if alike else None
    if images:
        per_image = sum(alike) / len(alike)
        return epochs * per_image * images, (
            f"like {len(alike)} finished run(s) of its kind on other data ({device}): "
            f"{per_image * 1e3:.3g} ms per training image x {images:,} images"
        )
    found = bench_estimate(cfg, device, bench)
    if found:
        return epochs * found[0], found[1]
    return None, "no estimate: no finished run of its kind, no bench record"


def plan_tables(
    ids: Sequence[str], profile: str, overrides: Sequence[str] = (), bench_path: Path | None = None
) -> list[TablePlan]:
    """Each table of ``ids`` with the runs it needs, in the order ``tables --run`` runs them
    (``bench_path``: the bench's epoch records, default :data:`BENCH_EPOCHS`)."""
    from bnn_adapt.thesis.table_runs import sweep_overrides, without_protocol

    def need_table(spec: str) -> Table:
        name = spec.partition(":")[0]
        known = next((t for t in TABLES.values() if t.sweep == name), None)
        return known or Table(name, name, name, "pretrain")  # a sweep of bases without a table of its own

    expanded: list[tuple[str, Table, list]] = []  # (spec, table, rows), each sweep (or part of one) once
    listed: set[str] = set()
    per_table: dict[str, list[str]] = {}
    for table_id in ids:
        table = TABLES[table_id]
        specs = [*table.needs, table.sweep]
        per_table[table_id] = specs
        for spec in specs:
            name, _, part = spec.partition(":")
            if spec in listed or name in listed:
                continue
            listed.add(spec)
            sweep_table = table if spec == table.sweep else need_table(spec)
            given = sweep_overrides(table, overrides) if spec == table.sweep else without_protocol(overrides)
            expanded.append((spec, sweep_table, table_rows(sweep_table, profile, [*given, *([part] if part else [])])))
    measured = measured_epochs([(t, rows) for _, t, rows in expanded])
    bench = read_bench(BENCH_EPOCHS if bench_path is None else bench_path)
    by_spec = {spec: (t, rows) for spec, t, rows in expanded}
    plans, shown, planned = [], set(), set()
    for table_id in ids:
        plan = TablePlan(TABLES[table_id])
        for spec in per_table[table_id]:
            if spec in shown or spec not in by_spec:  # a base sweep an earlier table of the plan lists
                plan.listed_before.append(spec)
                continue
            shown.add(spec)
            sweep_table, rows = by_spec[spec]
            for row in rows:
                for job in row.jobs:
                    if job.run_dir in planned:  # a whole sweep after a part of it (table 6.1 after 6.2's base)
                        continue
                    planned.add(job.run_dir)
                    seconds, source = estimate(job, measured, bench)
                    epochs = 0 if job.cfg.get("summary_only") else int(job.cfg.trainer.max_epochs)
                    plan.runs.append(PlannedRun(spec, row.label, job.run_dir, job.status, epochs, seconds, source))
        plans.append(plan)
    return plans


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def describe(plans: list[TablePlan], profile: str, bench_path: Path | None = None) -> str:
    """The plan as text: per table its runs, their state, time and its source; totals."""
    lines = [
        f"Plan for profile {profile}: every run each table needs (its bases first), whether it is complete, "
        f"and its time: measured, or estimated from finished runs' epoch times on this machine or the bench's "
        f"epoch records ({BENCH_EPOCHS if bench_path is None else bench_path})."
    ]
    for plan in plans:
        done = [r for r in plan.runs if r.done]
        rest = [r for r in plan.runs if not r.done]
        lines += [
            "",
            f"table {plan.table.id}: {plan.table.title} -- {len(done)} of {len(plan.runs)} runs complete"
            f" ({_hours(sum(r.seconds or 0 for r in done))} measured); {_to_go(plan.remaining_s, plan.unknown, len(rest))}"
            + (f"; also needs {', '.join(plan.listed_before)}, listed above" if plan.listed_before else ""),
            f"  {'status':10} {'epochs':>6} {'time':>9}  {'sweep':12} {'row':34} source",
        ]
        for r in plan.runs:
            status = r.status if r.status != STALE else "stale (runs again)"
            lines.append(
                f"  {status:10} {r.epochs:>6} {_hms(r.seconds):>9}  {r.sweep.partition(':')[0]:12} "
                f"{r.label[:34]:34} {r.source}"
            )
    runs = [r for p in plans for r in p.runs]
    rest = sum(not r.done for r in runs)
    lines += [
        "",
        f"every table: {sum(r.done for r in runs)} of {len(runs)} runs complete; "
        f"{_to_go(sum(p.remaining_s for p in plans), sum(p.unknown for p in plans), rest)}",
    ]
    return "\n".join(lines)


def _to_go(seconds: float, unknown: int, rest: int) -> str:
    if not rest:
        return "nothing to go"
    if unknown == rest:
        return f"{rest} to go, no estimate yet (run one of a kind, or make bench)"
    return f"about {_hours(seconds)} to go" + (
        f" and {unknown} runs without an estimate (so at least that)" if unknown else ""
    )
