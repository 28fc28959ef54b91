"""The thesis figures: test accuracy per epoch, training loss, and accuracy against weights introduced."""

from __future__ import annotations

import csv
from pathlib import Path

from bnn_adapt.run.record import RunRecord
from bnn_adapt.thesis.table_runs import Row, Table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_losses(run_dir: Path, metrics: RunRecord) -> tuple[list[float], list[float]]:
    """(steps, losses) from Lightning's CSV log; per-epoch losses from metrics.json if there is none."""
    path = run_dir / "csv" / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as f:
            points = [
                (float(r["step"]), float(r["train/loss_step"]))
                for r in csv.DictReader(f)
                if r.get("train/loss_step") and r.get("step")
            ]
        if points:
            return [p[0] for p in points], [p[1] for p in points]
    losses = metrics.epoch_losses()
    return [epoch for epoch, _ in losses], [loss for _, loss in losses]


def plot_curves(table: Table, rows: list[Row], out: Path) -> list[Path]:
    """Test accuracy per epoch and training-loss curves, one line per run."""
    if table.kind == "counts":
        return []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    written = []
    for name, ylabel in (("test_accuracy", "test top-1"), ("train_loss", "training loss")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 rows in distinct colours
        for row in rows:
            for i, job in enumerate(j for j in row.jobs if j.metrics):
                metrics = job.metrics
                if name == "test_accuracy":
                    points = metrics.epoch_top1()
                    xs, ys = [epoch + 1 for epoch, _ in points], [top1 for _, top1 in points]
                else:
                    xs, ys = training_losses(job.run_dir, metrics)
                if xs:
                    ax.plot(
                        xs, ys, marker="." if len(xs) < 30 else None, alpha=0.85, label=row.label if i == 0 else None
                    )
        ax.set_xlabel("epoch" if name == "test_accuracy" else "training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"Table {table.id}: {ylabel}", fontsize=10)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{table.stem}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_accuracy_vs_weights(tables: list[tuple[Table, list[Row]]], path: Path) -> Path:
    """Top-1 against log(weights introduced), every adaptation run, one panel per dataset."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    points: dict[str, list[tuple[str, float, float, str]]] = {}
    for table, rows in tables:
        if table.kind != "adapt":
            continue
        for row in rows:
            for m in row.runs:
                weights, top1 = m.introduced_weights, m.test_top1
                if weights and top1 is not None:
                    dataset = m.config["data"]["name"]
                    points.setdefault(dataset, []).append((m.strategy or "?", weights, top1, table.id))
    panels = sorted(points) or ["(no runs yet)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    markers = {"head_only": "s", "full_finetune": "*", "serial": "o", "udta": "^", "lora": "D", "bitfit": "v"}
    # one colour per strategy in every panel
    strategies = list(markers) + sorted({p[0] for ps in points.values() for p in ps} - set(markers))
    colors = {s: plt.cm.tab10.colors[i % 10] for i, s in enumerate(strategies)}
    for ax, dataset in zip(axes[0], panels, strict=True):
        for strategy in sorted({p[0] for p in points.get(dataset, [])}):
            chosen = [p for p in points[dataset] if p[0] == strategy]
            ax.scatter(
                [p[1] for p in chosen],
                [p[2] for p in chosen],
                marker=markers.get(strategy, "x"),
                color=colors[strategy],
                label=strategy,
                alpha=0.8,
            )
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
