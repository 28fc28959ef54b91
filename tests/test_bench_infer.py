"""make bench-infer (issue #16): a tiny run writes the documented records, tables and
README section. Structure only; speed-ups are measured by the real run, never asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_infer
from bnn_adapt.deploy import packed_kernels

pytestmark = pytest.mark.skipif(not packed_kernels.available(), reason="the packed kernels are not built here")
REQUIRED = {
    "model": str,
    "batch": int,
    "layer": str,
    "packed_s": float,
    "float_s": float,
    "speedup": float,
    "exact": bool,
}


def tiny_bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "benchmarks"
    return bench_infer.main(["--tiny", "--models", "ste_resnet_cifar", "--batches", "1,2", "--out", str(out), *extra])


def test_tiny_bench_writes_layer_and_end_to_end_records(tmp_path):
    out = tmp_path / "benchmarks"
    result = tiny_bench(tmp_path, "--no-memory")  # the memory probes, fresh processes: the integration test below
    assert json.loads((out / "inference.json").read_text()) == json.loads(json.dumps(result))
    records = result["records"]
    for r in records:
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["packed_s"] > 0 and r["float_s"] > 0
    # every binary conv of the STE base (stem excluded), per batch, plus one end-to-end record each
    layers = {r["layer"] for r in records if r["layer"] != "end_to_end"}
    assert len(layers) == 3 * 2 * 2 + 2 and all(r["exact"] for r in records if r["layer"] != "end_to_end")
    assert {r["kernel"] for r in records if r["layer"] != "end_to_end"} == {"3x3", "1x1"}
    e2e = [r for r in records if r["layer"] == "end_to_end"]
    assert [r["batch"] for r in e2e] == [1, 2]
    assert all(r["same_top1"] and 0 <= r["kernel_share_packed"] <= 1 and r["base_speedup"] > 0 for r in e2e)
    assert result["memory"] == []
    table = (out / "inference.md").read_text()
    assert "| model | batch | 3x3 binary convs" in table and "| target | goal | measured |" in table
    assert "stages.1.0.shortcut.0" in table  # the per-layer table
    assert "end to end" in table


@pytest.mark.integration  # a fresh process per probe
def test_tiny_bench_writes_memory_records(tmp_path):
    (memory,) = tiny_bench(tmp_path)["memory"]
    assert memory["packed_file_bytes"] > 0 and memory["live_tensor_packed_bytes"] < memory["live_tensor_float_bytes"]
