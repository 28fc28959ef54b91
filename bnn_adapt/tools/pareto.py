"""Size-vs-accuracy Pareto search (``hparams_search=size_vs_accuracy``) and its report.

Hydra's Optuna sweeper runs NSGA-II with two objectives, maximise the final test
top-1 and minimise the size % of the base (conf/hparams_search/size_vs_accuracy.yaml);
the task's metrics are turned into those values by :func:`bnn_adapt.run.task.sweeper_value`. When the
search ends, :class:`ParetoFrontReport` (a Hydra callback) writes, from the trials' own
``metrics.json`` files, ``trials.csv`` (every trial), ``pareto_front.csv`` (the
non-dominated ones) and ``pareto_front.png`` (every trial, the front highlighted, and
the thesis table configurations on the same data and base marked when those runs exist).

    python -m bnn_adapt.tools.pareto SWEEP_DIR       # the same report again, e.g. for a search run elsewhere
"""

from __future__ import annotations

import csv
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnn_adapt.run import config as _resolvers  # noqa: F401 - ${range:...} etc. in the configs read here
from bnn_adapt.run.results import read_json_or_none
from bnn_adapt.tools.report import run_label

log = logging.getLogger(__name__)

OBJECTIVES = (("test_top1", "maximize"), ("size_pct", "minimize"))


@functools.lru_cache(maxsize=None)
def _stage_count(base_name: str) -> int:
    from bnn_adapt.bases import BASES

    return len(BASES[base_name](width=0.05).stages)


def serial_stages(cfg: DictConfig, trial) -> None:
    """Conditional search space (the sweeper's ``custom_search_space``): serial adapters
    choose where they go -- after every stage, the last two, or the last one."""
    if trial.params.get("adapter") != "serial":
        return
    n = _stage_count(cfg.base.name)
    options = [list(range(1, n + 1)), [n - 1, n], [n]]
    trial.suggest_categorical("adapter.stages", [str(o).replace(" ", "") for o in options])


# ----------------------------------------------------------------------------- the front


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both objectives (higher top-1, smaller size)."""

    def dominates(a: dict, b: dict) -> bool:
        better_or_equal = a["test_top1"] >= b["test_top1"] and a["size_pct"] <= b["size_pct"]
        return better_or_equal and (a["test_top1"] > b["test_top1"] or a["size_pct"] < b["size_pct"])

    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: p["size_pct"])


def trial_points(sweep_dir: Path) -> list[dict]:
    """Every finished trial under ``sweep_dir``: objectives, a label and the searched settings."""
    points = []
    for path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        metrics = read_json_or_none(path)
        if not metrics or metrics.get("status", "complete") != "complete" or metrics.get("test_top1") is None:
            continue
        cfg = metrics.get("config", {})
        adapter, reduction = cfg.get("adapter", {}), cfg.get("reduction", {})
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        points.append(
            {
                "run_dir": str(path.parent),
                "label": run_label(metrics),
                "test_top1": metrics["test_top1"],
                "size_pct": metrics["size_pct"],
                "adapter_macs": metrics.get("adapter_macs"),  # per image: compute beside size and accuracy
                "adapter": adapter.get("name"),
                "stages": ",".join(str(s) for s in adapter.get("stages", []) or []),
                "groups": reduction.get("groups"),
                "rate": reduction.get("rate"),
                "lr": adapter.get("lr"),
                "overrides": " ".join(overrides),
            }
        )
    return points


def thesis_points(tables_dir: Path, like: dict) -> list[dict]:
    """Adaptation runs of the thesis tables on the same data, classes and base as the search."""
    points = []
    for path in sorted(Path(tables_dir).glob("table_*/*/metrics.json")):
        metrics = read_json_or_none(path)
        if not metrics or metrics.get("status", "complete") != "complete" or metrics.get("task") != "adapt":
            continue
        cfg = OmegaConf.create(metrics.get("config", {}))
        same = all(OmegaConf.select(cfg, key) == value for key, value in like.items())
        if same and metrics.get("test_top1") is not None:
            table = path.parent.parent.name.removeprefix("table_").replace("_", ".")
            points.append({"label": f"{table}: {run_label(metrics)}", "test_top1": metrics["test_top1"],
                           "size_pct": metrics["size_pct"]})  # fmt: skip
    return points


def write_points(path: Path, points: list[dict]) -> None:
    keys = list(dict.fromkeys(k for p in points for k in p)) or ["test_top1", "size_pct"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(points)


def plot_front(path: Path, points: list[dict], front: list[dict], thesis: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"serial": "o", "udta": "^"}
    for strategy in sorted({p["adapter"] for p in points}, key=str):
        chosen = [p for p in points if p["adapter"] == strategy]
        marker = markers.get(strategy, "x")
        ax.scatter([p["size_pct"] for p in chosen], [p["test_top1"] for p in chosen], marker=marker, alpha=0.45,
                   color="grey", label=f"trials: {strategy}")  # fmt: skip
    if front:
        ax.step([p["size_pct"] for p in front], [p["test_top1"] for p in front], where="post", color="tab:red")
        ax.scatter([p["size_pct"] for p in front], [p["test_top1"] for p in front], color="tab:red", zorder=3,
                   label="Pareto front")  # fmt: skip
    if thesis:
        ax.scatter([p["size_pct"] for p in thesis], [p["test_top1"] for p in thesis], marker="*", s=110,
                   facecolor="none", edgecolor="black", label="thesis table configurations")  # fmt: skip
        for p in thesis:
            ax.annotate(p["label"], (p["size_pct"], p["test_top1"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("size (% of the base's memory, log scale)")
    ax.set_ylabel("test top-1 (final)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: Path, tables_dir: Path | None = None, like: dict | None = None) -> dict[str, Path]:
    """trials.csv, pareto_front.csv and pareto_front.png in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    points = trial_points(sweep_dir)
    front = pareto_front(points)
    on_front = {p["run_dir"] for p in front}
    for p in points:
        p["on_front"] = p["run_dir"] in on_front
    thesis = thesis_points(tables_dir, like or {}) if tables_dir is not None and tables_dir.is_dir() else []
    files = {"trials": sweep_dir / "trials.csv", "front": sweep_dir / "pareto_front.csv",
             "plot": sweep_dir / "pareto_front.png"}  # fmt: skip
    write_points(files["trials"], points)
    write_points(files["front"], front)
    title = f"{sweep_dir.name}: {len(points)} trials, {len(front)} on the front"
    plot_front(files["plot"], points, front, thesis, title)
    return files


class ParetoFrontReport(Callback):
    """Hydra callback of the search: makes the sweep directory before Optuna opens its SQLite
    storage there, and writes the report when the search ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        profile = OmegaConf.select(config, "profile.name", default=None)
        tables_dir = Path(config.paths.log_dir) / "tables" / profile if profile else None
        like = {key: OmegaConf.select(config, key) for key in ("data.name", "base.name", "base.width")}
        like["data.target_classes"] = OmegaConf.to_container(config.data, resolve=True).get("target_classes")
        files = write_report(Path(config.hydra.sweep.dir), tables_dir, like)
        log.info("Pareto front: %s, %s", files["front"], files["plot"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bnn_adapt.tools.pareto SWEEP_DIR", file=sys.stderr)
        return 2
    files = write_report(Path(argv[0]))
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
