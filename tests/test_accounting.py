"""Accounting and the size metric (docs/concepts.md, Size) for every strategy, and the
counts pruning leaves (thesis ch. 6.4)."""

from __future__ import annotations

from unittest.mock import ANY

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from bnn_adapt.accounting import layer_table, parameter_rows, size_percent, summarize, totals
from bnn_adapt.adapters import FullFinetune, HeadOnly, Parallel, Serial
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear
from bnn_adapt.training.module import Classifier
from bnn_adapt.training.pruning import PruningPlan, is_pruning_epoch

C = 3  # target classes
TINY = [8, 16, 32]  # STE channels at width 0.1


def thin(c_in: int, c_out: int, g: int = 1) -> int:
    return c_in * (9 + 2) + c_in * c_out // g + 2 * c_out


def ste_base_counts(base: STEResNetCIFAR) -> tuple[int, int]:
    """(fp32, binary) from module types, independent of accounting.py."""
    binary = sum(m.weight.numel() for m in base.modules() if isinstance(m, BinaryConv2d))
    binary += sum(m.weight.numel() + m.bias.numel() for m in base.modules() if isinstance(m, BinaryLinear))
    fp32 = sum(
        m.weight.numel() + m.bias.numel() for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert binary + fp32 == sum(p.numel() for p in base.parameters())
    return fp32, binary


def tiny_base() -> STEResNetCIFAR:
    torch.manual_seed(0)
    return STEResNetCIFAR(num_classes=10, width=0.1)


# ---------------------------------------------------------------------------
# the size formula


@pytest.mark.parametrize(
    "n_fp32, n_bin, big_fp32, big_bin, expected",
    [
        (10, 64, 100, 3_200, 6.0),  # (320 + 64) / (3200 + 3200)
        (0, 32, 1, 0, 100.0),
        (1, 0, 0, 3_200, 1.0),
        (0, 0, 5, 5, 0.0),
        (20, 3_210, 6_260, 4_331_770, 100 * 3_850 / 4_532_090),  # STE head at full width
        (2, 1, 3, 4, 100 * 65 / 100),
    ],
)
def test_size_percent_by_hand(n_fp32, n_bin, big_fp32, big_bin, expected):
    assert size_percent(n_fp32, n_bin, big_fp32, big_bin) == pytest.approx(expected, rel=1e-12)


def test_size_percent_weighs_fp32_32_times_a_binary_param():
    assert size_percent(1, 0, 0, 1000) == pytest.approx(32 * size_percent(0, 1, 0, 1000))
    assert size_percent(0, 1, 1, 0) == pytest.approx(100 / 32)


# ---------------------------------------------------------------------------
# summarize, per strategy


def expected_summary(model, adapter_fp32, adapter_bin, head_fp32, head_bin, base=None) -> dict:
    base_fp32, base_bin = ste_base_counts(model.base) if base is None else base
    n_fp32, n_bin = adapter_fp32 + head_fp32, adapter_bin + head_bin
    return {
        "strategy": model.strategy,
        "base_binary_params": base_bin,
        "base_fp32_params": base_fp32,
        "adapter_fp32_params": adapter_fp32,
        "adapter_binary_params": adapter_bin,
        "head_fp32_params": head_fp32,
        "head_binary_params": head_bin,
        "introduced_fp32_params": n_fp32,
        "introduced_binary_params": n_bin,
        "size_pct": pytest.approx(100 * (32 * n_fp32 + n_bin) / (32 * base_fp32 + base_bin), rel=1e-12),
        "adapter_size_pct": pytest.approx(
            100 * (32 * adapter_fp32 + adapter_bin) / (32 * base_fp32 + base_bin), rel=1e-12
        ),
        "head_size_pct": pytest.approx(100 * (32 * head_fp32 + head_bin) / (32 * base_fp32 + base_bin), rel=1e-12),
        "base_bits": 32 * base_fp32 + base_bin,
        "weight_bits": 32,
        "adapter_quantized_params": 0,
        "head_quantized_params": 0,
        "introduced_quantized_params": 0,
        "introduced_bits": 32 * n_fp32 + n_bin,
        "thesis": ANY,  # the thesis's own convention: tests/test_thesis_accounting.py
    }


def test_base_totals_at_tiny_width():
    base = tiny_base()
    c1, c2, c3 = TINY
    binary = 27 * c1 + 36 * c1 * c1 + 9 * c1 * c2 + 27 * c2 * c2 + c1 * c2 + 9 * c2 * c3 + 27 * c3 * c3 + c2 * c3
    binary += 10 * c3 + 10
    fp32 = 2 * (5 * c1 + 5 * c2 + 5 * c3) + 2 * c3 + 2 * 10
    assert ste_base_counts(base) == (fp32, binary)
    assert totals(parameter_rows(base)) == (fp32, binary)


def test_summarize_head_only():
    model = HeadOnly(tiny_base(), C)
    s = summarize(model)
    assert s == expected_summary(model, 0, 0, 2 * C, 32 * C + C)
    assert s["size_pct"] == pytest.approx(size_percent(2 * C, 33 * C, s["base_fp32_params"], s["base_binary_params"]))


def test_summarize_full_finetune_counts_the_whole_base_but_its_old_classifier():
    model = FullFinetune(tiny_base(), C)
    base_fp32, base_bin = ste_base_counts(model.base)
    # old classifier: binary linear(32 -> 10) with bias, BN1d(10)
    s = summarize(model)
    assert s == expected_summary(model, base_fp32 - 20, base_bin - (32 * 10 + 10), 2 * C, 33 * C)
    assert s["introduced_fp32_params"] + s["introduced_binary_params"] > s["base_binary_params"]


@pytest.mark.parametrize("stages, g", [([1, 2, 3], 1), ([3], 1), ([2], 1), ([1, 2, 3], 2), ([1, 3], 4)])
def test_summarize_serial(stages, g):
    model = Serial(tiny_base(), C, stages=stages, groups=g)
    adapter = sum(4 * c + c * c // g for c in (TINY[s - 1] for s in stages))
    assert summarize(model) == expected_summary(model, adapter, 0, 2 * C, 33 * C)


def test_summarize_serial_three_stages_by_hand():
    s = summarize(Serial(tiny_base(), C, stages=[1, 2, 3], groups=1))
    assert s["adapter_fp32_params"] == (32 + 64) + (64 + 256) + (128 + 1024) == 1_568


@pytest.mark.parametrize("head, g", [("concat", 1), ("adapter", 1), ("concat", 2), ("concat", "channels")])
def test_summarize_parallel(head, g):
    model = Parallel(tiny_base(), C, head=head, groups=g)
    shapes = [(8, 16), (16, 32), (32, 32)]
    adapter = sum(thin(ci, co, ci if g == "channels" else g) for ci, co in shapes)
    head_in = 64 if head == "concat" else 32
    assert summarize(model) == expected_summary(model, adapter, 0, 2 * C, head_in * C + C)


def test_summarize_parallel_by_hand():
    s = summarize(Parallel(tiny_base(), C, head="concat"))
    assert s["adapter_fp32_params"] == (88 + 128 + 32) + (176 + 512 + 64) + (352 + 1024 + 64) == 2_440
    assert (s["head_binary_params"], s["head_fp32_params"]) == (195, 6)


def test_summarize_on_reactnet_counts_an_fp32_head():
    torch.manual_seed(1)
    base = ReActNet18(num_classes=10, width=0.125)  # 8/16/32/64 channels
    base_rows = parameter_rows(base)
    model = Parallel(base, C, head="concat")
    shapes = [(8, 16), (16, 32), (32, 64), (64, 64)]
    s = summarize(model)
    assert s == expected_summary(
        model, sum(thin(ci, co) for ci, co in shapes), 0, 128 * C + C, 0, base=totals(base_rows)
    )
    # base binary = the scaled binary convs' weights only
    binary_convs = sum(
        m.binary_conv.weight.numel()
        for stage in base.stages
        for m in stage  # one per block
    )
    assert s["base_binary_params"] == binary_convs


# ---------------------------------------------------------------------------
# pruning


def whole_zero_filters(conv: nn.Conv2d) -> int:
    return int((conv.weight.detach().flatten(1) == 0).all(dim=1).sum())


def zeros(conv: nn.Conv2d) -> int:
    return int((conv.weight.detach() == 0).sum())


def assert_pruned(model: Parallel, dw_rate: float, pw_rate: float) -> tuple[int, int]:
    """Check per-conv counts; return (depthwise zeros, pointwise zeros)."""
    depthwise, pointwise = model.prune_targets()
    assert len(depthwise) == len(pointwise) == len(model.adapter.blocks)
    dw_zeros = pw_zeros = 0
    for conv in depthwise:
        c = conv.out_channels
        assert whole_zero_filters(conv) == round(dw_rate * c)
        assert zeros(conv) == 9 * round(dw_rate * c)  # only whole filters are zero
        dw_zeros += zeros(conv)
    for conv in pointwise:
        assert zeros(conv) == round(pw_rate * conv.weight.numel())
        pw_zeros += zeros(conv)
    return dw_zeros, pw_zeros


def test_prune_now_counts_and_summary():
    model = Parallel(tiny_base(), C, head="concat")
    before = summarize(model)
    PruningPlan(0.5, 0.8, (1,)).apply(model)

    dw_zeros, pw_zeros = assert_pruned(model, 0.5, 0.8)
    assert dw_zeros == 9 * (4 + 8 + 16)
    assert pw_zeros == 102 + 410 + 819  # round(0.8 * 128 / 512 / 1024)

    keys = model.state_dict().keys()
    assert not any(k.endswith("_mask") or k.endswith("_orig") for k in keys)
    assert "adapter.blocks.0.depthwise.weight" in keys

    after = summarize(model)
    assert after["adapter_fp32_params"] == before["adapter_fp32_params"] - dw_zeros - pw_zeros
    assert after["head_fp32_params"] == before["head_fp32_params"]
    assert after["head_binary_params"] == before["head_binary_params"]
    assert after["base_bits"] == before["base_bits"]
    assert after["size_pct"] == pytest.approx(
        size_percent(after["adapter_fp32_params"] + 6, 195, after["base_fp32_params"], after["base_binary_params"])
    )
    assert after["size_pct"] < before["size_pct"]


def test_prune_now_grouped_and_zero_rates():
    model = Parallel(tiny_base(), C, head="adapter", groups=2)
    before = summarize(model)
    PruningPlan(0.0, 0.9, (1,)).apply(model)
    dw_zeros, pw_zeros = assert_pruned(model, 0.0, 0.9)
    assert dw_zeros == 0
    assert pw_zeros == round(0.9 * 64) + round(0.9 * 256) + round(0.9 * 512)
    assert summarize(model)["adapter_fp32_params"] == before["adapter_fp32_params"] - pw_zeros


def test_parameter_rows_count_an_active_mask():
    model = Parallel(tiny_base(), C)
    conv = model.adapter.blocks[2].pointwise
    prune.l1_unstructured(conv, "weight", amount=0.75)
    rows = {r.name: r for r in parameter_rows(model.adapter)}
    assert "blocks.2.pointwise.weight" in rows and "blocks.2.pointwise.weight_orig" not in rows
    assert rows["blocks.2.pointwise.weight"].params == 1024 - 768
    assert rows["blocks.2.pointwise.weight"].kind == "fp32"


def test_pruning_callbacks_prune_once_like_prune_now():
    torch.manual_seed(2)
    model = Parallel(tiny_base(), C, head="concat")
    callbacks = PruningPlan(0.5, 0.8, (1,)).callbacks(model)
    # one ModelPruning per kind (structured depthwise, unstructured pointwise) + the resume guard
    assert sum(isinstance(c, ModelPruning) for c in callbacks) == 2
    assert [is_pruning_epoch(e, 2) for e in range(4)] == [False, True, False, False]
    module = Classifier(model, C, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    data = TensorDataset(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2] * 2))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=6))
    # pruned after epoch 0; epoch 1 trained with the masks; masks removed at the end
    keys = model.state_dict().keys()
    assert not any(k.endswith("_mask") or k.endswith("_orig") for k in keys)
    dw_zeros, pw_zeros = assert_pruned(model, 0.5, 0.8)
    s = summarize(model)
    full = sum(thin(ci, co) for ci, co in [(8, 16), (16, 32), (32, 32)])
    assert s["adapter_fp32_params"] == full - dw_zeros - pw_zeros


# ---------------------------------------------------------------------------
# per-layer table


def introduced_names(model) -> list[str]:
    if isinstance(model, FullFinetune):
        return [n for n, _ in model.named_parameters() if n.startswith("base.") and not n.startswith("base.classifier")]
    return [n for n, _ in model.named_parameters() if n.startswith(("adapter.", "head."))]


@pytest.mark.parametrize(
    "make",
    [
        lambda b: HeadOnly(b, C),
        lambda b: FullFinetune(b, C),
        lambda b: Serial(b, C, stages=[1, 3]),
        lambda b: Parallel(b, C, head="concat"),
    ],
    ids=["head_only", "full_finetune", "serial", "udta"],
)
def test_layer_table_lists_every_introduced_parameter_and_the_size(make):
    model = make(tiny_base())
    table = layer_table(model)
    lines = table.splitlines()
    names = introduced_names(model) + [n for n, _ in model.named_parameters() if n.startswith("head.")]
    assert names
    first_column = {line.split()[0] for line in lines if line.strip()}
    for name in names:
        assert name in first_column, name
    # nothing of the frozen base is listed for the frozen strategies
    if not isinstance(model, FullFinetune):
        assert not any(line.startswith("base.") for line in lines)
    s = summarize(model)
    assert f"size {s['size_pct']:.3f}% of the base" in table
    assert f"{s['base_binary_params']:,} binary + {s['base_fp32_params']:,} fp32" in table
    # each row's params and bits agree
    for line in lines:
        parts = line.split()
        if len(parts) == 5 and parts[2] in ("binary", "fp32"):
            params, bits = int(parts[3].replace(",", "")), int(parts[4].replace(",", ""))
            assert bits == params * (1 if parts[2] == "binary" else 32)


def test_layer_table_after_pruning_shows_non_zero_counts():
    model = Parallel(tiny_base(), C)
    PruningPlan(0.5, 0.8, (1,)).apply(model)
    table = layer_table(model)
    row = next(line for line in table.splitlines() if line.startswith("adapter.blocks.2.pointwise.weight "))
    assert row.split()[3] == f"{1024 - 819:,}"


def test_layer_table_of_a_plain_base():
    base = tiny_base()
    fp32, binary = ste_base_counts(base)
    table = layer_table(base)
    assert f"base: {binary:,} binary + {fp32:,} fp32 params ({32 * fp32 + binary:,} bits)" in table
    assert "base.stem.0.weight" in table
