"""The thesis tables' sweeps: which tables there are, which runs each expects, where, and in what state.

A table is one Hydra multirun, ``sweeps/<sweep>.yaml``, whose ``table:`` node
describes it (id, title, kind, the sweeps it needs first). Its rows are the
sweep's jobs, expanded exactly as Hydra's basic sweeper expands them, each
job's config composed; a row's run directory is where Hydra puts it
(``hydra.sweep.dir`` / ``hydra.job.override_dirname``), and its
``metrics.json`` (``summary.json`` for count-only tables) is the only source
of numbers. :func:`run_sweeps` runs a table's sweeps, bases first.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt.run.config import REPO_ROOT, SWEEPS_DIR, compose, without_hydra_node
from bnn_adapt.run.labels import run_label
from bnn_adapt.run.record import RunRecord, result_problem
from bnn_adapt.run.results import config_hash


@dataclass(frozen=True)
class Table:
    """One table: the sweep that produces its rows and what it shows (the sweep file's ``table:`` node)."""

    id: str  # "6.2"; output files are table_<id with _>.md/.csv
    sweep: str  # sweeps/<sweep>.yaml
    title: str
    kind: str  # "counts" (summary_only), "pretrain" or "adapt"
    needs: tuple[str, ...] = ()  # sweeps to run first ("SWEEP:OVERRIDE" runs part of one)
    speedup_reference: str | None = None  # table whose finetune row times the speed-up, if not this one
    seeds: bool = False  # rows repeated over seeds: cells are mean ± std
    thesis: bool = True  # one of the thesis's tables
    #: the thesis's printed values (bnn_adapt/thesis/thesis_results.csv): this sweep's row (its swept
    #: overrides, e.g. ``row=serial_g1``) -> the thesis's row name; empty: the thesis prints no values
    thesis_rows: dict[str, str] = field(default_factory=dict)
    thesis_note: str | None = None  # where the thesis's own bookkeeping slipped, and what we do
    label_keys: tuple[str, ...] = ()  # config keys the sweep varies beside its rows, named in each row's label

    @property
    def stem(self) -> str:
        return "table_" + self.id.replace(".", "_")


def find_tables(sweeps_dir: Path = SWEEPS_DIR) -> dict[str, Table]:
    """Every sweep with a ``table:`` node, by table id, thesis tables first in id order."""
    found = []
    for path in sorted(sweeps_dir.glob("*.yaml")):
        node = OmegaConf.load(path).get("table")
        if node is not None:
            meta = OmegaConf.to_container(node)
            found.append(
                Table(
                    str(meta["id"]),
                    path.stem,
                    meta["title"],
                    meta["kind"],
                    tuple(meta.get("needs") or ()),
                    meta.get("speedup_reference"),
                    bool(meta.get("seeds")),
                    bool(meta.get("thesis", True)),
                    dict(meta.get("thesis_rows") or {}),
                    meta.get("thesis_note"),
                    tuple(meta.get("label_keys") or ()),
                )
            )
    found.sort(key=lambda t: (not t.thesis, t.id))
    return {t.id: t for t in found}


TABLES: dict[str, Table] = find_tables()
THESIS_TABLES = tuple(t for t in TABLES.values() if t.thesis)

BASE_LABELS = {
    "ste_resnet_cifar": "STE BNN (BinaryNet ResNet-18, CIFAR)",
    "resnet_cifar": "ResNet-18, fp32 (BinaryNet.pytorch CIFAR, 16/32/64 ch)",
    "resnet18_cifar": "ResNet-18, fp32 (CIFAR stem)",
    "reactnet18": "ReActNet-18",
    "resnet18": "ResNet-18, fp32 (torchvision)",
}


STALE = "stale"  # finished, but with another config or data than the sweep's today (code, defaults or files changed)


@dataclass
class Job:
    """One expected run: its overrides, composed config and run directory, and what it left there."""

    overrides: tuple[str, ...]
    cfg: DictConfig
    run_dir: Path
    result_file: str
    config_hash: str  # what the task will record for this config (bnn_adapt.results.config_hash)

    @functools.cached_property
    def result(self) -> RunRecord | None:
        return RunRecord.read(self.run_dir, self.result_file)

    @functools.cached_property
    def status(self) -> str:
        result = self.result
        if result is None:
            return "incomplete" if self.run_dir.is_dir() else "not run"
        if not result.complete:
            return result.status
        if self.result_file != "metrics.json":  # counts (summary.json): no data read
            return STALE if result.config_hash != self.config_hash else result.status
        return STALE if result_problem(result, without_hydra_node(self.cfg), self.config_hash) else result.status

    @property
    def metrics(self) -> RunRecord | None:
        """The run's numbers, also when stale (shown, and marked)."""
        return self.result if self.status in ("complete", STALE) else None


@dataclass
class Row:
    label: str
    jobs: list[Job] = field(default_factory=list)
    key: str = ""  # the row's swept overrides, e.g. ``row=serial_g1`` (a table's ``thesis_rows`` key)

    @property
    def runs(self) -> list[RunRecord]:
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
            if result and result.failed:
                return str(result.error or "failed")
        return None


def _compose(sweep: str, overrides: Sequence[str]) -> DictConfig:
    """A job's full config (Hydra's node included)."""
    return compose(overrides, config_name=sweep, config_dir=SWEEPS_DIR, return_hydra_config=True)


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

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return config_hash(without_hydra_node(cfg))


def without_protocol(overrides: Sequence[str]) -> list[str]:
    """``overrides`` less any ``protocol=...``: the protocol is how a base is adapted, so pretraining
    sweeps (bases, table 6.1) and count tables run and are found the same under every protocol."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "protocol"]


def sweep_overrides(table: Table, overrides: Sequence[str]) -> list[str]:
    """The overrides ``table``'s own sweep runs with (and its run directories are named after)."""
    return list(overrides) if table.kind == "adapt" else without_protocol(overrides)


def table_rows(table: Table, profile: str, overrides: Sequence[str] = ()) -> list[Row]:
    """The table's rows in sweep order, each with its run(s); seeds of one row are grouped."""
    rows: dict[tuple, Row] = {}
    result_file = "summary.json" if table.kind == "counts" else "metrics.json"
    given = [f"profile={profile}", *sweep_overrides(table, overrides)]
    for job_overrides in expand_sweep(table.sweep, given):
        cfg = _compose(table.sweep, job_overrides)
        run_dir = Path(cfg.hydra.sweep.dir) / cfg.hydra.job.override_dirname
        key = tuple(o for o in job_overrides if not (table.seeds and o.split("=", 1)[0] == "seed"))
        swept = ",".join(o for o in key if o not in given)
        row = rows.setdefault(key, Row(row_label(table, cfg), key=swept))
        row.jobs.append(Job(tuple(job_overrides), cfg, run_dir, result_file, expected_hash(cfg, run_dir)))
    return list(rows.values())


def row_label(table: Table, cfg: DictConfig) -> str:
    if table.kind in ("counts", "pretrain"):
        return BASE_LABELS.get(cfg.base.name, cfg.base.name)
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("adapter", "reduction")}
    label = run_label({"config": parts})
    label = {"full_finetune": "finetune", "head_only": "head only"}.get(label, label)
    return label + "".join(f" {key}={OmegaConf.select(cfg, key)}" for key in table.label_keys)


def run_sweeps(table: Table, profile: str, overrides: Sequence[str] = (), done: set[str] | None = None) -> None:
    """Run the sweeps ``table`` needs, then its own, as ``python -m bnn_adapt --multirun`` does.

    A sweep that crashes leaves its rows marked in the table; the others go on.
    ``done`` (shared across tables) skips a sweep, or part of one, already run in this call.
    """
    done = set() if done is None else done
    for spec in [*table.needs, table.sweep]:
        name, _, part = spec.partition(":")
        if spec in done or name in done:
            continue
        print(f"== sweep {name} {part} (profile {profile})", flush=True)
        # what a table needs first are base pretrainings: the same under every protocol
        given = sweep_overrides(table, overrides) if spec == table.sweep else without_protocol(overrides)
        command = [
            sys.executable,
            "-m",
            "bnn_adapt",
            "--multirun",
            "--config-dir",
            "sweeps",
            "--config-name",
            name,
            f"profile={profile}",
            *([part] if part else []),
            *given,
        ]
        if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
            print(f"== sweep {name} did not finish: its missing rows are marked in the table", flush=True)
        done.add(spec)
