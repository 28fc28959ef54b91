"""Run reports from metrics.json files, and the allocator setting training runs with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnn_adapt import report


def write_pretrain_run(
    root, memory: str, seed: int, top1: float, losses=(2.0, 1.5, 1.25), weight=0.5, spelling: str = "current"
) -> None:
    """A pretraining run's files as the task writes them: metrics.json, Lightning's CSV log, last.ckpt
    (``spelling="0.1"``: the memory mode under ``trainer.memory``, as runs of 0.1 recorded it)."""
    run = root / f"{memory}_seed{seed}"
    (run / "csv").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    config = {"seed": seed, **({"trainer": {"memory": memory}} if spelling == "0.1" else {"memory": memory})}
    metrics = {"task": "pretrain", "test_top1": top1, "config": config}
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = ["epoch,step,train/loss_step,val/acc"] + [f"0,{step},{loss!r}," for step, loss in enumerate(losses)]
    rows.append(f"0,{len(losses)},,{top1}")  # an eval row: no step loss
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    state = {"base.weight": torch.full((2, 2), weight), "base.bn.num_batches_tracked": torch.tensor(3)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 2), weight / 10)}}}
    torch.save({"state_dict": state, "optimizer_states": [optimizer]}, run / "checkpoints" / "last.ckpt")


def test_pretrain_runs_are_compared_with_standard_at_the_same_seed(tmp_path, capsys):
    """Top-1, every per-step loss and every checkpoint tensor, against standard at the same seed."""
    for seed, top1 in enumerate((0.90, 0.80)):
        write_pretrain_run(tmp_path, "standard", seed, top1)
        write_pretrain_run(tmp_path, "lean", seed, top1, spelling="0.1" if seed else "current")
    write_pretrain_run(tmp_path, "lean_fp16", 0, 0.88, losses=(2.0, 1.5, 1.2), weight=0.5 + 2**-10)
    write_pretrain_run(tmp_path, "lean_fp16", 1, 0.81)
    assert report.main([str(tmp_path)]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["standard", "lean", "lean_fp16"]
    cells = {mode: [c.strip() for c in row.split("|")[2:-1]] for mode, row in rows.items()}
    assert cells["standard"] == ["0.9000", "0.8000", "0.8500", "-", "-", "-", "-", "-"]
    assert cells["lean"] == ["0.9000", "0.8000", "0.8500", "0.0000", "6 of 6", "0", "2 of 2 seeds", "0"]
    assert cells["lean_fp16"][:4] == ["0.8800", "0.8100", "0.8450", "0.0200"]
    assert cells["lean_fp16"][4] == "5 of 6"
    assert float(cells["lean_fp16"][5]) == pytest.approx(0.05, rel=1e-3)
    assert cells["lean_fp16"][6] == "1 of 2 seeds"
    assert float(cells["lean_fp16"][7]) == pytest.approx(2**-10, rel=1e-3)  # printed to 3 digits


def test_report_without_runs_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no adaptation runs" in capsys.readouterr().err


RESIDENT_AFTER_FREE = """
import sys, torch
from bnn_adapt.training import allocator
assert getattr(allocator, sys.argv[1])()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, above glibc's largest default mmap threshold
del x
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc")
@pytest.mark.parametrize("setting, kept", [("keep_freed_memory", True), ("return_freed_memory", False)])
def test_allocator_keeps_or_returns_a_freed_large_tensor(setting, kept):
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT_AFTER_FREE, setting], capture_output=True, text=True, check=True
    )
    grown = int(out.stdout.strip())
    assert (grown > 32 << 20) == kept, grown
