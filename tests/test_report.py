"""Run reports from metrics.json files, and the allocator setting training runs with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnn_adapt.tools import report


def write_pretrain_run(root, memory: str, seed: int, top1: float) -> None:
    run = root / f"{memory}_seed{seed}"
    run.mkdir(parents=True)
    metrics = {"task": "pretrain", "test_top1": top1, "config": {"seed": seed, "trainer": {"memory": memory}}}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_pretrain_runs_are_compared_with_standard_at_the_same_seed(tmp_path, capsys):
    for memory, tops in {"standard": (0.90, 0.80), "lean_fp16": (0.88, 0.81), "lean": (0.90, 0.80)}.items():
        for seed, top1 in enumerate(tops):
            write_pretrain_run(tmp_path, memory, seed, top1)
    assert report.main([str(tmp_path)]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["standard", "lean", "lean_fp16"]
    cells = [c.strip() for c in rows["lean_fp16"].split("|")[2:-1]]
    assert cells == ["0.8800", "0.8100", "0.8450", "0.0200"]
    assert rows["lean"].split("|")[-2].strip() == "0.0000"
    assert rows["standard"].split("|")[-2].strip() == "-"


def test_report_without_runs_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no adaptation runs" in capsys.readouterr().err


RESIDENT_AFTER_FREE = """
import sys, torch
from bnn_adapt import allocator
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
    out = subprocess.run([sys.executable, "-c", RESIDENT_AFTER_FREE, setting], capture_output=True, text=True,
                         check=True)  # fmt: skip
    grown = int(out.stdout.strip())
    assert (grown > 32 << 20) == kept, grown
