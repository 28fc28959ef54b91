"""Tables from run directories' own ``metrics.json`` files (no typed numbers).

``python -m bnn_adapt.report DIR`` prints one Markdown row per adaptation run
found under DIR: strategy, top-1, weights introduced, size %, epoch time and
speed-up against full finetuning in the same set of runs. Base pretraining
runs (``task=pretrain``, e.g. ``make lean-check``) get one row per
``trainer.memory`` mode instead: top-1 per seed and the largest difference
from standard autograd at the same seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bnn_adapt.files import read_json
from bnn_adapt.run.labels import run_label


def find_runs(root: str | Path, task: str = "adapt") -> list[dict]:
    """``task`` runs under ``root`` (for adaptation: nested base pretraining runs skipped)."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        metrics = read_json(path)
        if metrics.get("task") == task:
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


def memory_table(runs: list[dict]) -> str:
    """Final top-1 of base pretraining per ``trainer.memory`` mode and seed, against standard's."""
    by_mode: dict[str, dict[int, float | None]] = {}
    for r in runs:
        cfg = r.get("config", {})
        by_mode.setdefault(cfg.get("trainer", {}).get("memory", "standard"), {})[cfg.get("seed")] = r.get("test_top1")
    seeds = sorted({seed for results in by_mode.values() for seed in results}, key=str)
    standard = by_mode.get("standard", {})
    lines = [
        "| trainer.memory | " + " | ".join(f"top-1 seed {s}" for s in seeds) + " | mean | max abs. difference from standard |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    order = ("standard", "lean", "lean_fp16")
    for mode, results in sorted(by_mode.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        values = [v for v in results.values() if v is not None]
        diffs = [abs(v - standard[s]) for s, v in results.items() if v is not None and standard.get(s) is not None]
        lines.append(
            f"| {mode} | " + " | ".join(fmt(results.get(s), ".4f") for s in seeds)
            + f" | {fmt(sum(values) / len(values) if values else None, '.4f')}"
            + f" | {fmt(max(diffs) if diffs and mode != 'standard' else None, '.4f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bnn_adapt.report RUNS_DIR", file=sys.stderr)
        return 2
    runs = find_runs(argv[0])
    if not runs and (pretrained := find_runs(argv[0], task="pretrain")):
        print(memory_table(pretrained))
        return 0
    if not runs:
        print(f"error: no adaptation runs (metrics.json) under {argv[0]}", file=sys.stderr)
        return 1
    print(strategy_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
