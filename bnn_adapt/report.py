"""Tables from run directories' own ``metrics.json`` files (no typed numbers).

``python -m bnn_adapt.report DIR`` prints one Markdown row per adaptation run
found under DIR: strategy, top-1, weights introduced, size %, epoch time and
speed-up against full finetuning in the same set of runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bnn_adapt.results import read_json


def run_label(metrics: dict) -> str:
    """A short name for what a run did, e.g. ``serial g=10 stages 1,2,3``."""
    cfg = metrics.get("config", {})
    adapter, reduction = cfg.get("adapter", {}), cfg.get("reduction", {})
    label = adapter.get("name", metrics.get("strategy", "?"))
    if label == "serial":
        label += f" stages {','.join(str(s) for s in adapter.get('stages', []))}"
    if label == "udta":
        label += f" head={adapter.get('head')}"
    if reduction.get("name") == "groups" or (reduction.get("groups", 1) not in (1, None)):
        label += f" g={reduction.get('groups')}"
    if label == "lora":
        stages = adapter.get("stages")
        label += f" r={adapter.get('rank')}" + (f" stages {','.join(str(s) for s in stages)}" if stages else "")
    if reduction.get("name") == "prune":
        label += f" prune {reduction.get('rate')}"
    if reduction.get("name") == "prune_iterative":
        rewind = " rewind" if reduction.get("rewind") else ""
        label += f" prune {reduction.get('rate')} in {reduction.get('rounds')} rounds{rewind}"
    if reduction.get("head_rate"):
        label += f" head columns {reduction.get('head_rate')}"
    return label


def find_runs(root: str | Path) -> list[dict]:
    """Adaptation runs under ``root`` (nested base pretraining runs skipped)."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        metrics = read_json(path)
        if metrics.get("task") == "adapt":
            metrics["run_dir"] = str(path.parent)
            runs.append(metrics)
    return runs


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def strategy_table(runs: list[dict]) -> str:
    finetune = [r["epoch_time_s"] for r in runs if r.get("strategy") == "full_finetune" and r.get("epoch_time_s")]
    reference = finetune[0] if finetune else None
    header = (
        "| strategy | top-1 (final) | best top-1 | fp32 weights introduced | binary weights introduced "
        "| size % of base | epoch time (s) | speed-up vs finetune |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in runs:
        speedup = reference / r["epoch_time_s"] if reference and r.get("epoch_time_s") else None
        lines.append(
            f"| {run_label(r)} | {fmt(r.get('test_top1'), '.4f')} | {fmt(r.get('best_test_top1'), '.4f')} "
            f"| {fmt(r.get('introduced_fp32_params'), ',')} | {fmt(r.get('introduced_binary_params'), ',')} "
            f"| {fmt(r.get('size_pct'), '.3f')} | {fmt(r.get('epoch_time_s'), '.2f')} | {fmt(speedup, '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bnn_adapt.report RUNS_DIR", file=sys.stderr)
        return 2
    runs = find_runs(argv[0])
    if not runs:
        print(f"error: no adaptation runs (metrics.json) under {argv[0]}", file=sys.stderr)
        return 1
    print(strategy_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
