"""Tables from run directories' own ``metrics.json`` files (no typed numbers).

``python -m bnn_adapt.report DIR`` prints one Markdown row per adaptation run
found under DIR: strategy, top-1, weights introduced, size %, epoch time and
speed-up against full finetuning in the same set of runs. Base pretraining
runs (``task=pretrain``, e.g. ``make lean-check``) get one row per
``memory`` mode instead, against standard autograd at the same seed:
top-1 per seed, every per-step training loss (``csv/metrics.csv``) and every
tensor of the final checkpoint (``checkpoints/last.ckpt``: weights, BN
statistics, Adam's state), each as identical or by the largest difference.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from bnn_adapt.adapters.strategy import STRATEGIES
from bnn_adapt.errors import CheckpointError
from bnn_adapt.files import load_weights
from bnn_adapt.run.labels import run_label
from bnn_adapt.run.record import RecordError, RunRecord


def find_runs(root: str | Path, task: str = "adapt") -> list[RunRecord]:
    """``task`` runs under ``root`` (for adaptation: nested base pretraining runs skipped)."""
    runs = (RunRecord.from_json(path) for path in sorted(Path(root).rglob("metrics.json")))
    return [run for run in runs if run.task == task]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def strategy_table(runs: list[RunRecord]) -> str:
    whole_base = [  # the epoch time of a run that trains its whole base: the reference
        r.epoch_time_s for r in runs if getattr(STRATEGIES.get(r.strategy), "trains_base", False) and r.epoch_time_s
    ]
    reference = whole_base[0] if whole_base else None
    header = (
        "| strategy | top-1 (final) | best top-1 | fp32 weights introduced | binary weights introduced "
        "| size % of base | epoch time (s) | speed-up vs finetune |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in runs:
        speedup = reference / r.epoch_time_s if reference and r.epoch_time_s else None
        lines.append(
            f"| {run_label(r.to_dict())} | {fmt(r.test_top1, '.4f')} | {fmt(r.best_test_top1, '.4f')} "
            f"| {fmt(r.introduced_fp32_params, ',')} | {fmt(r.introduced_binary_params, ',')} "
            f"| {fmt(r.size_pct, '.3f')} | {fmt(r.epoch_time_s, '.2f')} | {fmt(speedup, '.2f')} |"
        )
    return "\n".join(lines)


def step_losses(run_dir: str | Path) -> list[float] | None:
    """The per-step training loss Lightning's CSV logger wrote (``train/loss_step``), in step order."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [(int(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return [loss for _, loss in sorted(rows)]


def checkpoint_tensors(run_dir: str | Path) -> dict | None:
    """Every tensor of the run's final checkpoint (``checkpoints/last.ckpt``): weights, BN statistics
    and the optimiser's state."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    import torch

    payload = load_weights(path, "checkpoint", "delete it or run the pretraining again", error=CheckpointError)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not Lightning's checkpoint dict")
    tensors = {f"state_dict.{k}": v for k, v in payload.get("state_dict", {}).items()}
    for i, optimizer in enumerate(payload.get("optimizer_states", [])):
        for param, state in optimizer.get("state", {}).items():
            for key, value in state.items():
                tensors[f"optimizer{i}.{param}.{key}"] = torch.as_tensor(value)
    return tensors


def compare_losses(losses: list[float] | None, reference: list[float] | None) -> tuple[int, int, float | None]:
    """(steps whose loss is identical, steps compared, largest absolute difference)."""
    if not losses or not reference:
        return 0, 0, None
    if len(losses) != len(reference):
        return 0, max(len(losses), len(reference)), None
    same = sum(a == b for a, b in zip(losses, reference, strict=True))
    return same, len(reference), max(abs(a - b) for a, b in zip(losses, reference, strict=True))


def compare_checkpoints(tensors: dict | None, reference: dict | None) -> tuple[bool, float | None]:
    """(every tensor bit-identical, largest absolute difference of a floating-point value)."""
    if tensors is None or reference is None or tensors.keys() != reference.keys():
        return False, None
    import torch

    equal, largest = True, 0.0
    for name, value in reference.items():
        other = tensors[name]
        if other.shape != value.shape:
            return False, None
        if not torch.equal(other, value):
            equal = False
            if value.is_floating_point():
                largest = max(largest, float((other.double() - value.double()).abs().max()))
    return equal, largest


def memory_table(runs: list[RunRecord]) -> str:
    """Base pretraining per ``memory`` mode and seed against standard's at the same seed:
    final top-1, every per-step loss and every tensor of the final checkpoint."""
    by_mode: dict[str, dict] = {}
    for r in runs:
        cfg = r.config or {}
        mode = cfg.get("memory") or cfg.get("trainer", {}).get("memory") or "standard"  # 0.1: trainer.memory
        by_mode.setdefault(mode, {})[cfg.get("seed")] = r
    seeds = sorted({seed for results in by_mode.values() for seed in results}, key=str)
    standard = by_mode.get("standard", {})
    reference = {s: (step_losses(r.run_dir), checkpoint_tensors(r.run_dir)) for s, r in standard.items()}
    lines = [
        "| memory | "
        + " | ".join(f"top-1 seed {s}" for s in seeds)
        + " | mean | max abs. difference from standard | per-step losses identical to standard "
        "| max abs. loss difference | final checkpoint identical to standard | max abs. difference in it |",
        "|---|" + "---|" * (len(seeds) + 6),
    ]
    order = ("standard", "lean", "lean_fp16")
    for mode, results in sorted(by_mode.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        tops = {s: r.test_top1 for s, r in results.items()}
        values = [v for v in tops.values() if v is not None]
        diffs = [
            abs(v - standard[s].test_top1)
            for s, v in tops.items()
            if v is not None and s in standard and standard[s].test_top1 is not None
        ]
        cells = ["-"] * 4
        if mode != "standard":
            same = total = identical = 0
            loss_diffs, weight_diffs = [], []
            for seed, r in results.items():
                losses, tensors = reference.get(seed, (None, None))
                equal, steps, largest = compare_losses(step_losses(r.run_dir), losses)
                same, total = same + equal, total + steps
                loss_diffs += [largest] if largest is not None else []
                equal_ckpt, largest_w = compare_checkpoints(checkpoint_tensors(r.run_dir), tensors)
                identical += equal_ckpt
                weight_diffs += [largest_w] if largest_w is not None else []
            cells = [
                f"{same:,} of {total:,}" if total else "-",
                fmt(max(loss_diffs) if loss_diffs else None, ".3g"),
                f"{identical} of {len(results)} seeds",
                fmt(max(weight_diffs) if weight_diffs else None, ".3g"),
            ]
        lines.append(
            f"| {mode} | "
            + " | ".join(fmt(tops.get(s), ".4f") for s in seeds)
            + f" | {fmt(sum(values) / len(values) if values else None, '.4f')}"
            + f" | {fmt(max(diffs) if diffs and mode != 'standard' else None, '.4f')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bnn_adapt.report RUNS_DIR", file=sys.stderr)
        return 2
    try:
        runs = find_runs(argv[0])
        if not runs and (pretrained := find_runs(argv[0], task="pretrain")):
            print(memory_table(pretrained))
            return 0
    except (CheckpointError, RecordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: no adaptation runs (metrics.json) under {argv[0]}", file=sys.stderr)
        return 1
    print(strategy_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
