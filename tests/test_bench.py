"""The benchmark (make bench, SPEC 7): a tiny run writes the documented records
and table; the saved-tensor meter counts what autograd keeps."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bnn_adapt.tools import bench

REQUIRED = {
    "model": str,
    "strategy": str,
    "memory": str,
    "cache_taps": bool,
    "step_time_s": float,
    "saved_activation_bytes": int,
    "saved_activation_bytes_base": int,
    "peak_rss_bytes": int,
}
RATIOS = ("speedup_vs_finetune", "activation_ratio_vs_standard")


def check_records(records: list[dict], models: set[str]) -> None:
    assert {r["model"] for r in records} == models
    for r in records:
        for key, kind in REQUIRED.items():
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
        finetune = next(r for r in records if r["model"] == model and r["strategy"] == "full_finetune"
                        and r["memory"] == "standard")  # fmt: skip
        assert finetune["speedup_vs_finetune"] == 1.0 and finetune["activation_ratio_vs_standard"] == 1.0


def run_tiny(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "benchmarks"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.README_START}\nold\n{bench.README_END}\n\nafter\n")
    records = bench.main(["--tiny", "--out", str(out), "--readme", str(readme), *extra])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(records))
    table = (out / "results.md").read_text()
    assert "| model | strategy | memory |" in table and "speed-up vs finetune" in table
    text = readme.read_text()
    assert "old" not in text and table.strip() in text and text.endswith("after\n")
    return records


def test_tiny_bench_of_the_ste_base_writes_records_and_table(tmp_path):
    records = run_tiny(tmp_path, "--models", "ste_resnet_cifar")
    check_records(records, {"ste_resnet_cifar"})
    pretrain = {r["memory"]: r for r in records if r["strategy"] == "pretrain"}
    assert pretrain["standard"]["saved_activation_bytes"] >= 3 * pretrain["lean"]["saved_activation_bytes"]
    udta = [r for r in records if r["strategy"] == "udta"]
    assert all(r["saved_activation_bytes_base"] == 0 for r in udta)


@pytest.mark.slow
def test_quick_tiny_bench_of_both_bases(tmp_path):
    records = run_tiny(tmp_path, "--quick")
    check_records(records, {"ste_resnet_cifar", "reactnet18"})


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
