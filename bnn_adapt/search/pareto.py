"""Size-vs-accuracy Pareto search (``hparams_search=size_vs_accuracy``) and its report.

Hydra's Optuna sweeper runs NSGA-II with two objectives, maximise the final validation
top-1 (``data.val_fraction`` of the training images: the search never sees the test set) and
minimise the size % of the base at real bits (conf/hparams_search/size_vs_accuracy.yaml;
``adapter.bits`` is one of the dimensions); the task's metrics are turned into those values by
:func:`bnn_adapt.run.task.sweeper_value`. When the search ends, :class:`ParetoFrontReport` (a
Hydra callback) writes, from the trials' own ``metrics.json`` files, ``trials.csv`` (every
trial, with its test top-1, measured once at its end), ``pareto_front.csv`` (the trials that
no other beats on validation top-1 and size) and ``pareto_front.png`` (every trial at its test top-1,
coloured by its weight bits and marked by strategy, the front and the front of the 32-bit
trials alone, and the thesis table configurations on the same data and base when those runs
exist).

    python -m bnn_adapt.search.pareto SWEEP_DIR                       # the same report again
    python -m bnn_adapt.search.pareto SWEEP_DIR --baseline OTHER_DIR  # + compare with another search's front
    python -m bnn_adapt.search.pareto SWEEP_DIR --baseline OTHER_DIR --limit 100   # below 100 % of the base
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnn_adapt.adapters.strategy import STRATEGIES
from bnn_adapt.errors import UserError
from bnn_adapt.files import atomic_output
from bnn_adapt.report import run_label
from bnn_adapt.run import config as _resolvers  # noqa: F401 - ${range:...} etc. in the configs read here
from bnn_adapt.run.record import RunRecord
from bnn_adapt.search import owners, study
from bnn_adapt.search.space import check_search_space, suggest_groups

log = logging.getLogger(__name__)

OBJECTIVES = (("val_top1", "maximize"), ("size_pct", "minimize"))
SELECTED_ON = OBJECTIVES[0][0]  # the accuracy the front is chosen on; test_top1 is only reported
SMALL = 5.0  # % of the base: where the bits are meant to help (where adapters below 32 bits pay off)


@functools.cache
def _stage_count(target: str) -> int:
    from bnn_adapt.bases import base_class

    return len(base_class(target)(width=0.05).stages)


def adapter_stages(cfg: DictConfig, trial) -> None:
    """Conditional search space (the sweeper's ``custom_search_space``): a strategy with placements to
    search chooses where its adapters go among its ``search_stages``."""
    strategy = STRATEGIES.get(str(trial.params.get("adapter")))
    options = strategy.search_stages(_stage_count(cfg.base.net._target_)) if strategy is not None else []
    if options:
        trial.suggest_categorical("adapter.stages", [str(o).replace(" ", "") for o in options])


def search_space(cfg: DictConfig, trial) -> None:
    """The sweeper's hook for each new trial (``custom_search_space``): record who runs it and fail
    the trials of workers killed meanwhile (:mod:`bnn_adapt.search.owners`); hand the job its
    trial's number as ``search.trial`` (a parameter of one value: the sweeper makes every parameter an
    override of the job, which names its run directory and reports to its trial with it); then the
    conditional part of the space, and the group counts the base runs
    (:mod:`bnn_adapt.search.space`)."""
    owners.watch(trial)
    for line in owners.fail_stale(trial.storage, trial.study._study_id):
        print(f"note: marked failed, {line}", file=sys.stderr)
    trial.suggest_int("search.trial", trial.number, trial.number)
    adapter_stages(cfg, trial)
    suggest_groups(cfg, trial)


# ----------------------------------------------------------------------------- the front


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both objectives (higher validation top-1, smaller size)."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: p["size_pct"])


def trial_points(sweep_dir: Path) -> list[dict]:
    """Every finished trial under ``sweep_dir``: objectives, a label and the searched settings."""
    points, unvalidated = [], 0
    for path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        metrics = RunRecord.read(path.parent)
        if not metrics or not metrics.complete:
            continue
        if metrics.value(SELECTED_ON) is None:  # trained without a validation split
            unvalidated += 1
            continue
        if metrics.same_as:  # a trial that proposed a configuration trained before: that one counts
            continue
        cfg = metrics.config or {}
        adapter, reduction = cfg.get("adapter", {}), cfg.get("reduction", {})
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        points.append(
            {
                "run_dir": str(path.parent),
                "label": run_label(metrics.to_dict()),
                SELECTED_ON: metrics.value(SELECTED_ON),
                "test_top1": metrics.test_top1,  # measured once, after training: reported, never searched
                "size_pct": metrics.size_pct,
                "adapter_macs": metrics.adapter_macs,  # per image: compute beside size and accuracy
                "adapter": adapter.get("name"),
                "stages": ",".join(str(s) for s in adapter.get("stages", []) or []),
                "groups": adapter.get("groups", reduction.get("groups")),
                "bits": adapter.get("bits", 32),
                "rate": reduction.get("rate"),
                "lr": adapter.get("lr"),
                "overrides": " ".join(overrides),
            }
        )
    if unvalidated:
        log.warning(
            "%d finished trials in %s have no %s (trained without data.val_fraction): left out of the "
            "front; rerun them with a validation split",
            unvalidated,
            sweep_dir,
            SELECTED_ON,
        )
    return points


def thesis_points(tables_dir: Path, like: dict) -> list[dict]:
    """Adaptation runs of the thesis tables on the same data, classes and base as the search."""
    points = []
    for path in sorted(Path(tables_dir).glob("table_*/*/metrics.json")):
        metrics = RunRecord.read(path.parent)
        if not metrics or not metrics.complete or metrics.task != "adapt":
            continue
        cfg = OmegaConf.create(metrics.config or {})
        same = all(OmegaConf.select(cfg, key) == value for key, value in like.items())
        if same and metrics.test_top1 is not None:
            table = path.parent.parent.name.removeprefix("table_").replace("_", ".")
            points.append(
                {
                    "label": f"{table}: {run_label(metrics.to_dict())}",
                    "test_top1": metrics.test_top1,
                    "size_pct": metrics.size_pct,
                }
            )
    return points


def write_points(path: Path, points: list[dict]) -> None:
    keys = list(dict.fromkeys(k for p in points for k in p)) or [SELECTED_ON, "test_top1", "size_pct"]
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(points)


def hypervolume(front: list[dict], limit: float = SMALL) -> float:
    """Area (size % x top-1) a front dominates below ``limit`` % of the base, from top-1 0: larger is better."""
    area, points = 0.0, sorted((p for p in front if p["size_pct"] < limit), key=lambda p: p["size_pct"])
    for k, p in enumerate(points):
        right = points[k + 1]["size_pct"] if k + 1 < len(points) else limit
        area += (right - p["size_pct"]) * max(q[SELECTED_ON] for q in points[: k + 1])
    return area


def dominates(a: dict, b: dict) -> bool:
    no_worse = a[SELECTED_ON] >= b[SELECTED_ON] and a["size_pct"] <= b["size_pct"]
    return no_worse and (a[SELECTED_ON] > b[SELECTED_ON] or a["size_pct"] < b["size_pct"])


def compare_fronts(front: list[dict], baseline: list[dict], limit: float = SMALL) -> dict:
    """How ``front`` stands against ``baseline`` below ``limit`` % of the base: the baseline points it
    dominates, those it reaches (a point of ``front`` at least as good on both objectives), and both
    hypervolumes; top-1 is the one the search selects on (``SELECTED_ON``), as for the fronts."""
    small = [p for p in baseline if p["size_pct"] < limit]
    beaten = [p for p in small if any(dominates(q, p) for q in front)]
    reached = [
        p for p in small if any(q[SELECTED_ON] >= p[SELECTED_ON] and q["size_pct"] <= p["size_pct"] for q in front)
    ]
    return {
        "limit_pct": limit,
        "baseline_points": len(small),
        "baseline_points_dominated": len(beaten),
        "baseline_points_reached": len(reached),
        "dominates": bool(small) and len(beaten) == len(small),
        "hypervolume": hypervolume(front, limit),
        "baseline_hypervolume": hypervolume(baseline, limit),
    }


def epochs_trained(sweep_dir: Path) -> int:
    """Epochs a search trained, over its trials (pruned ones included; a reused configuration trained none)."""
    runs = (RunRecord.read(path.parent) for path in Path(sweep_dir).glob("*/metrics.json"))
    return sum(int(m.epochs_run or 0) for m in runs if m is not None and not m.same_as)


def plot_front(
    path: Path,
    points: list[dict],
    front: list[dict],
    thesis: list[dict],
    title: str,
    baseline: list[dict] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = dict(zip(sorted({p["adapter"] for p in points}, key=str), "o^sDvP*", strict=False))
    widths = sorted({int(p.get("bits", 32)) for p in points}, reverse=True)
    colours = dict(
        zip(widths, plt.get_cmap("viridis")([i / max(1, len(widths) - 1) for i in range(len(widths))]), strict=True)
    )
    for strategy in sorted({p["adapter"] for p in points}, key=str):
        for width in widths:
            chosen = [p for p in points if p["adapter"] == strategy and int(p.get("bits", 32)) == width]
            if chosen:
                ax.scatter(
                    [p["size_pct"] for p in chosen],
                    [p["test_top1"] for p in chosen],
                    marker=markers.get(strategy, "x"),
                    alpha=0.6,
                    color=colours[width],
                    label=f"{strategy}, {width}-bit",
                )
    if front:
        ax.step([p["size_pct"] for p in front], [p["test_top1"] for p in front], where="post", color="tab:red")
        ax.scatter(
            [p["size_pct"] for p in front],
            [p["test_top1"] for p in front],
            facecolor="none",
            edgecolor="tab:red",
            s=90,
            zorder=3,
            label="Pareto front",
        )
    only32 = pareto_front([p for p in points if int(p.get("bits", 32)) == 32]) if len(widths) > 1 else []
    others = ((only32, "front of the 32-bit trials", ":"), (baseline or [], "baseline search's front", "--"))
    for other, label, style in others:
        if other:
            ax.step(
                [p["size_pct"] for p in other],
                [p["test_top1"] for p in other],
                where="post",
                color="black",
                linestyle=style,
                marker="s",
                markersize=4,
                fillstyle="none",
                label=label,
            )
    if thesis:
        ax.scatter(
            [p["size_pct"] for p in thesis],
            [p["test_top1"] for p in thesis],
            marker="*",
            s=110,
            facecolor="none",
            edgecolor="black",
            label="thesis table configurations",
        )
        for p in thesis:
            ax.annotate(
                p["label"], (p["size_pct"], p["test_top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.axvline(SMALL, color="grey", linewidth=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("size (% of the base's memory at real bits, log scale)")
    ax.set_ylabel("test top-1 (measured once; the front is chosen on validation top-1)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(
    sweep_dir: Path,
    tables_dir: Path | None = None,
    like: dict | None = None,
    baseline_dir: Path | None = None,
    limit: float = SMALL,
) -> dict[str, Path]:
    """trials.csv, pareto_front.csv, pareto_front.png and comparison.json in ``sweep_dir``, of finished trials
    only (a trial directory with complete results; a killed or failed trial has none): the front against the
    front of its own 32-bit trials and, given ``baseline_dir``, that search's front, below ``limit`` % of the
    base; and the epochs each search trained."""
    sweep_dir = Path(sweep_dir)
    points = trial_points(sweep_dir)
    front = pareto_front(points)
    on_front = {p["run_dir"] for p in front}
    for p in points:
        p["on_front"] = p["run_dir"] in on_front
    thesis = thesis_points(tables_dir, like or {}) if tables_dir is not None and tables_dir.is_dir() else []
    baseline = pareto_front(trial_points(baseline_dir)) if baseline_dir is not None else None
    files = {
        "trials": sweep_dir / "trials.csv",
        "front": sweep_dir / "pareto_front.csv",
        "plot": sweep_dir / "pareto_front.png",
        "comparison": sweep_dir / "comparison.json",
    }
    write_points(files["trials"], points)
    write_points(files["front"], front)
    own32 = pareto_front([p for p in points if p["bits"] == 32])
    comparison = {
        "epochs_trained": epochs_trained(sweep_dir),
        "front_vs_own_32_bit_trials": compare_fronts(front, own32, limit),
    }
    if baseline is not None:
        comparison["front_vs_baseline"] = {
            "baseline": str(baseline_dir),
            **compare_fronts(front, baseline, limit),
            "baseline_epochs_trained": epochs_trained(baseline_dir),
        }
    with atomic_output(files["comparison"]) as tmp:  # several workers of one search may write at once
        tmp.write_text(json.dumps(comparison, indent=1) + "\n")
    title = f"{sweep_dir.name}: {len(points)} finished trials, {len(front)} on the front"
    with atomic_output(files["plot"]) as tmp:
        plot_front(tmp, points, front, thesis, title, baseline)
    return files


class ParetoFrontReport(Callback):
    """Hydra callback of the search: checks the search space against the base, makes the sweep directory
    before Optuna opens its storage there, checks the storage (:func:`bnn_adapt.search.study.storage_setting`), fails the trials that killed
    workers left RUNNING, and writes the report when the search ends."""

    storage: str | None = None
    started = False  # Hydra 1.4 calls on_multirun_end also when a search stopped before its start

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_search_space(config)  # a group count the base cannot run: one line before the first trial
            self.storage = study.storage_setting(config)
            Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
            if self.storage:  # a stored study that this worker continues or shares
                for line in owners.fail_stale_trials(self.storage, str(config.hydra.sweeper.study_name)):
                    print(f"note: marked failed, {line}", file=sys.stderr)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        self.started = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.started:
            return
        profile = OmegaConf.select(config, "profile.name", default=None)
        tables_dir = Path(config.paths.log_dir) / "tables" / profile if profile else None
        like = {key: OmegaConf.select(config, key) for key in ("data.name", "base.name", "base.width")}
        like["data.target_classes"] = OmegaConf.to_container(config.data, resolve=True).get("target_classes")
        files = write_report(Path(config.hydra.sweep.dir), tables_dir, like)
        name = str(config.hydra.sweeper.study_name)
        counts = owners.trial_counts(self.storage, name) if self.storage else {}
        states = ", ".join(f"{n} {state.lower()}" for state, n in counts.items()) or "not stored"
        log.info("study: %s; Pareto front of the finished trials: %s, %s", states, files["front"], files["plot"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.search.pareto", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a search's sweep directory (its trials' run directories inside)")
    parser.add_argument("--baseline", help="another search's sweep directory (e.g. 32-bit only) to compare with")
    parser.add_argument("--limit", type=float, default=SMALL, help="compare the fronts below this size %% of the base")
    args = parser.parse_args(argv)
    files = write_report(
        Path(args.sweep_dir), baseline_dir=Path(args.baseline) if args.baseline else None, limit=args.limit
    )
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    print(files["comparison"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
