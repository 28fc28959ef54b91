"""``make gpu-check``: every step in its own process and time limit, one report. On CPU (``--device cpu``,
tiny sizes) the whole check runs here, as CI runs it; the GPU sizes only on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import run_step
from benchmarks.gpu_check_steps import THESIS_STRATEGIES, Step, plan
from bnn_adapt.adapters import STRATEGIES
from tests.helpers.cli import REPO_ROOT, run_here


def test_a_failing_or_hanging_step_is_recorded_and_the_next_one_still_runs(tmp_path):
    python = [sys.executable, "-c"]
    hangs = run_step(Step("hangs", "run", [*python, "import time; time.sleep(60)"]), limit=2, log_dir=tmp_path)
    fails = run_step(Step("fails", "run", [*python, "print('boom'); raise SystemExit(3)"]), limit=30, log_dir=tmp_path)
    works = run_step(Step("works", "run", [*python, "pass"]), limit=30, log_dir=tmp_path)
    assert hangs["status"] == "timed out (2 s)" and hangs["time_s"] < 30
    assert fails["status"] == "failed (exit 3)" and "boom" in fails["log_tail"]
    assert works["status"] == "ok" and "log_tail" not in works


def test_without_a_gpu_the_cuda_check_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    result = run_here(tmp_path, "benchmarks.gpu_check", "--work", str(tmp_path))
    assert result.returncode == 2 and "make gpu-check DEVICE=cpu" in result.stderr and "Traceback" not in result.stderr


def test_an_environment_with_other_versions_is_refused_before_any_step(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--work", str(tmp_path), "--expect", "torch==0.0.1"]) == 2
    assert not (tmp_path / "logs").exists()


@pytest.mark.integration
@pytest.mark.timeout(3600)  # 20 steps, each a process of its own (its own limits apply inside)
def test_the_cpu_rehearsal_runs_every_step_and_reports_each(tmp_path):
    """``make gpu-check DEVICE=cpu``: all steps pass at tiny sizes; the report has a row and measures for each."""
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--budget",
            "3000",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {r["step"]: r for r in report["steps"]}
    expected = {s.name for s in plan("cpu", tmp_path, 0)}
    assert set(steps) == expected and len(expected) == 20
    assert steps.pop("udta_ddp_sync_bn")["status"].startswith("skipped: needs 2+ GPUs")
    assert all(r["status"] == "ok" for r in steps.values()), {n: r["status"] for n, r in steps.items()}
    trained = [
        *STRATEGIES,
        "udta_bf16",
        "udta_lean",
        "udta_tap_cache",
        "udta_ddp",
        *(f"thesis_epoch_{n}" for n in THESIS_STRATEGIES),
    ]
    for name in trained:
        r = steps[name]
        assert r["top1"] is not None and r["epoch_time_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_bytes"] > 0, r
    assert steps["udta_ddp"]["run_device"] == "cpu x 2"
    predictions = json.loads((tmp_path / "work" / "predictions.json").read_text())
    assert predictions and "udta_head_concat" in json.dumps(predictions)
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | " in table for name in expected) and report["environment"]["versions"]["torch"]
