"""The benchmark (make bench, docs/speed.md): a tiny run writes the documented records
and tables; every case trains on the same batch; the tap-cache case never runs
the base; peaks come from isolated, repeated processes whose reset is checked;
the saved-tensor meter counts what autograd keeps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import bench, bench_epoch, bench_memory
from benchmarks.bench_cases import TINY_SETUPS, Case, make_base, prepare, train_step

REQUIRED = {
    "model": str,
    "strategy": str,
    "memory": str,
    "cache_taps": bool,
    "step_time_s": float,
    "saved_activation_bytes": int,
    "saved_activation_bytes_base": int,
}
CACHE_REQUIRED = {"cache_build_s_per_image": float, "cache_bytes_per_image": int, "amortized_speedup": dict}
RATIOS = ("speedup_vs_finetune", "activation_ratio_vs_standard")
STE = TINY_SETUPS[0]
CPU = torch.device("cpu")


def check_records(records: list[dict], models: set[str]) -> None:
    assert {r["model"] for r in records} == models
    for r in records:
        for key, kind in {**REQUIRED, **(CACHE_REQUIRED if r["cache_taps"] else {})}.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["memory"] in ("standard", "lean", "lean_fp16") and r["step_time_s"] > 0
        for key in RATIOS:
            assert r[key] is None or r[key] > 0, (key, r)
        assert r["saved_activation_bytes_base"] <= r["saved_activation_bytes"]
    for model in models:
        strategies = {(r["strategy"], r["cache_taps"], r["memory"]) for r in records if r["model"] == model}
        for name in bench.adapter_names():
            assert {(name, False, "standard"), (name, False, "lean")} <= strategies
        assert {("udta", True, "standard"), ("udta", True, "lean")} <= strategies
        finetune = next(
            r for r in records if r["model"] == model and r["strategy"] == "full_finetune" and r["memory"] == "standard"
        )
        assert finetune["speedup_vs_finetune"] == 1.0 and finetune["activation_ratio_vs_standard"] == 1.0
        check_amortized(records, finetune)


def check_amortized(records: list[dict], finetune: dict) -> None:
    """Amortised speed-up = E x finetune step / (V x batch x build per image + E x cached step); below the per-step one."""
    for r in records:
        if not (r["cache_taps"] and r["model"] == finetune["model"]):
            continue
        amortized = r["amortized_speedup"]
        assert {"1x75", "4x10"} <= set(amortized)
        build = r["cache_build_s_per_image"] * r["batch_size"]
        for key, value in amortized.items():
            views, epochs = map(int, key.split("x"))
            expected = epochs * finetune["step_time_s"] / (views * build + epochs * r["step_time_s"])
            assert value == pytest.approx(expected, rel=1e-12)
            assert value < r["speedup_vs_finetune"]
        assert amortized["1x75"] > amortized["4x10"]
        assert r["cache_build_s_per_image"] > 0 and r["cache_bytes_per_image"] > 0


def run_tiny(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "benchmarks"
    records = bench.main(["--tiny", "--out", str(out), *extra])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(records))
    table = (out / "results.md").read_text()
    assert "| model | strategy | memory |" in table and "speed-up vs finetune" in table
    assert "amortised 1 views x 75 epochs" in table and "| CIFAR-100 80-20 (labels 0-19) |" in table
    return records


def test_tiny_bench_of_the_ste_base_writes_records_and_tables(tmp_path):
    records = run_tiny(tmp_path, "--models", "ste_resnet_cifar", "--peak-repeats", "0", "--only", "steps")
    check_records(records, {"ste_resnet_cifar"})
    pretrain = {r["memory"]: r for r in records if r["strategy"] == "pretrain"}
    assert pretrain["standard"]["saved_activation_bytes"] >= 3 * pretrain["lean"]["saved_activation_bytes"]
    udta = [r for r in records if r["strategy"] == "udta"]
    assert all(r["saved_activation_bytes_base"] == 0 for r in udta)
    assert all(r["peak_rss_bytes"] is None for r in records)  # --peak-repeats 0: not measured, and said so
    assert "Peak memory: not measured" in (tmp_path / "benchmarks" / "results.md").read_text()


@pytest.mark.integration
@pytest.mark.timeout(1800)  # CI runs it (.ci/run): over 600 s on 2 CPU cores shared with other jobs (load 12)
def test_quick_tiny_bench_of_both_bases(tmp_path):
    records = run_tiny(tmp_path, "--quick", "--peak-repeats", "1")
    check_records(records, {"ste_resnet_cifar", "reactnet18"})
    assert all(isinstance(r["peak_rss_bytes"], int) and r["step_peak_bytes"] >= 0 for r in records)


def test_every_case_trains_on_the_same_batch():
    base = make_base(STE)
    cases = [Case(STE, s, "standard") for s in ("full_finetune", "serial", "udta", "lora", "pretrain")]
    for case in cases:
        prepare(case, base, CPU)
    images, labels = cases[0].inputs
    for case in cases[1:]:
        assert torch.equal(case.inputs[0], images) and torch.equal(case.inputs[1], labels), case.strategy
    assert len(labels.unique()) > 1


@pytest.mark.parametrize(
    "strategy, cache_taps, runs_base",
    [
        ("udta", False, True),
        ("head_only", False, True),
        ("serial", False, True),
        ("full_finetune", False, True),
        ("udta", True, False),
    ],
)
def test_which_cases_run_the_base_forward(strategy, cache_taps, runs_base):
    case = Case(STE, strategy, "lean", cache_taps=cache_taps)
    prepare(case, make_base(STE), CPU)
    calls = []
    handle = case.model.base.stem.register_forward_hook(lambda *args: calls.append(1))
    try:
        train_step(case)
    finally:
        handle.remove()
    assert bool(calls) == runs_base
    if cache_taps:
        assert isinstance(case.inputs[0], tuple)  # it trains from the base's features, not from images


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peaks read /proc/self/status")


@LINUX
@pytest.mark.integration  # three fresh processes, each importing torch
def test_peaks_come_from_repeated_fresh_processes():
    spec = {
        "setup": STE.__dict__,
        "strategy": "udta",
        "memory": "lean",
        "cache_taps": False,
        "device": "cpu",
        "threads": 1,
        "steps": 1,
    }
    result = bench_memory.isolated_peaks(spec, repeats=3)
    runs = result["runs"]
    assert len(runs) == 3 and len({r["pid"] for r in runs} | {os.getpid()}) == 4
    assert result["peak_bytes"] == min(r["peak"] for r in runs)
    assert result["step_growth_bytes"] == min(r["peak"] - r["before"] for r in runs) >= 0
    assert 0 < result["baseline_bytes"] <= min(r["before"] for r in runs)


def test_a_peak_reset_that_fails_is_an_error(monkeypatch):
    plain_write = Path.write_text

    def refuse(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError("denied")
        return plain_write(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(bench_memory.PeakResetError, match="clear_refs"), bench_memory.PeakMemory(CPU):
        pass
    monkeypatch.setattr(Path, "write_text", plain_write)
    monkeypatch.setattr(bench_memory, "_status_bytes", lambda *fields: (3 << 30, 1 << 30))  # VmHWM stays high
    with pytest.raises(bench_memory.PeakResetError, match="did not reset"), bench_memory.PeakMemory(CPU):
        pass


@LINUX
def test_peak_memory_sees_a_block_s_own_allocation():
    from bnn_adapt.training import allocator

    allocator.return_freed_memory()
    with bench_memory.PeakMemory(CPU) as peak:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        del x
    assert peak.growth >= 60 << 20


def test_meter_counts_storages_once_and_skips_parameters():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            h = self.linear(x)  # saves x (an activation); the weight is a parameter
            return (h * h).sum()  # saves h once, though twice over

    model = Twice()
    x = torch.randn(3, 4, requires_grad=True)
    meter = bench.SavedTensorMeter(model, batch_size=3, base=model.linear)
    with meter.measuring():
        loss = model(x)
    loss.backward()
    assert meter.saved.activation == 2 * 3 * 4 * 4
    assert meter.saved.activation_base == 3 * 4 * 4  # x, saved inside the "base" module


# ------------------------------------------------------------------ whole epochs


EPOCH_KEYS = {
    "strategy": str,
    "cache_taps": bool,
    "train_images": int,
    "eval_images": int,
    "epoch_time_s": float,
    "bare_epoch_time_s": float,
    "images_per_s": float,
    "bare_images_per_s": float,
    "framework_vs_bare": float,
    "epoch_cpu_s": float,
    "bare_epoch_cpu_s": float,
    "framework_vs_bare_cpu": float,
}


def test_quick_epoch_records_time_the_framework_against_the_bare_loop(tmp_path):
    out = tmp_path / "benchmarks"
    bench.main(["--quick", "--tiny", "--only", "epochs", "--threads", "1", "--out", str(out)])
    records = json.loads((out / "epochs.json").read_text())
    setup = bench_epoch.EPOCH_SETUPS[("cpu", "tiny")]
    assert [(r["strategy"], r["cache_taps"]) for r in records] == list(bench_epoch.EPOCH_CASES)
    for r in records:
        for key, kind in EPOCH_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert (r["train_images"], r["eval_images"]) == (5 * setup.train_per_class, 5 * setup.eval_per_class)
        runs = setup.rounds * (setup.epochs - 1)  # the first epoch of each fit is warm-up
        assert len(r["epoch_times_s"]) == len(r["bare_epoch_times_s"]) == len(r["epoch_cpu_times_s"]) == runs
        assert r["framework_vs_bare"] == pytest.approx(r["epoch_time_s"] / r["bare_epoch_time_s"])
        assert r["framework_vs_bare_cpu"] == pytest.approx(r["epoch_cpu_s"] / r["bare_epoch_cpu_s"])
        assert r["images_per_s"] == pytest.approx(r["train_images"] / r["epoch_time_s"])
    assert not (out / "results.json").exists()  # --only epochs: no step cases
    table = (out / "results.md").read_text()
    assert "| strategy | width | train + eval images |" in table and "| udta + tap cache | 0.1 |" in table
    assert "framework / bare" in table and "<= 1.3x" in table

    # a later run of the step cases alone keeps these epoch records and their report, naming each run
    epochs_json = (out / "epochs.json").read_text()
    bench.main(
        [
            "--tiny",
            "--only",
            "steps",
            "--models",
            "ste_resnet_cifar",
            "--strategies",
            "head_only",
            "--peak-repeats",
            "0",
            "--out",
            str(out),
        ]
    )
    assert (out / "epochs.json").read_text() == epochs_json
    runs = json.loads((out / "machine.json").read_text())
    assert "--only steps" in runs["steps"]["command"] and "--only epochs" in runs["epochs"]["command"]
    both = (out / "results.md").read_text()
    assert "| model | strategy | memory |" in both and "| udta + tap cache | 0.1 |" in both
    assert "Whole epochs: `python -m benchmarks.bench --quick --tiny --only epochs" in both


@pytest.mark.parametrize(
    "strategy, cache_taps, extra",
    [("full_finetune", False, ()), ("udta", True, ()), ("serial", False, ("trainer.channels_last=true",))],
)
def test_the_bare_loop_trains_exactly_as_the_framework(tmp_path, strategy, cache_taps, extra):
    """Same work: from one model on un-augmented data, both paths end with the same weights and BN statistics
    (trainer.channels_last too: the run's model in NHWC memory, as the bare loop puts it)."""
    from bnn_adapt.training.datasets.cifar10 import write_cifar10

    setup = bench_epoch.EPOCH_SETUPS[("cpu", "tiny")]
    write_cifar10(tmp_path / "data" / "cifar10", n_per_class=setup.train_per_class)
    case = bench_epoch.EpochCase(strategy, cache_taps)
    bench_epoch.prepare_case(case, setup, CPU, tmp_path / "data", tmp_path / "run", ["data.augment=false", *extra])
    _, framework = bench_epoch.run_framework(case, CPU, tmp_path / "run")
    _, bare = bench_epoch.run_bare(case, CPU)
    before, after, other = case.model.state_dict(), framework.state_dict(), bare.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
    for key, value in after.items():
        assert torch.equal(value, other[key]), key
    stem = framework.base.stem[0].weight
    assert stem.is_contiguous(memory_format=torch.channels_last) == bool(extra) and not stem.is_contiguous() == bool(
        extra
    )
