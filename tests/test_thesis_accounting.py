"""The thesis's own size convention, pinned to the values its tables print, through the real
``summary_only`` runs at full width; the slips in its own bookkeeping are not copied."""

from __future__ import annotations

import math

import pytest
import torch

from bnn_adapt.accounting import summarize
from bnn_adapt.accounting.thesis import KEYS, deployed_base, thesis_counts
from bnn_adapt.adapters import FullFinetune, HeadOnly, Parallel, Serial
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.run import task

FLOWERS_BASE_BITS = 10_985_472 + 32 * (205_952 + 512 * 102 + 102)  # backbone + a plain 512->102 fp32 classifier


def thesis_summary(make_cfg, tmp_path, *overrides: str) -> dict:
    cfg = make_cfg(*overrides, "summary_only=true", tiny=False, base_dir=tmp_path / "no_bases")
    return task.run(cfg)["thesis"]


# Flowers-102 on ReActNet-18 (thesis table 6.6): UDTA, adapter / concat head, no pruning / pruned 0.99
@pytest.mark.parametrize(
    "head, rate, introduced, printed_pct",
    [
        ("adapter", 0.0, 447_552, 74.4),
        ("adapter", 0.99, 9_168, 1.5),
        ("concat", 0.0, 499_827, 83.1),
        ("concat", 0.99, 61_443, 10.2),
    ],
)
def test_flowers102_check_values(head, rate, introduced, printed_pct, make_cfg, tmp_path):
    pruning = ("reduction=prune", f"reduction.rate={rate}") if rate else ()
    t = thesis_summary(
        make_cfg, tmp_path, "+experiment=flowers102_udta", "base.checkpoint=null", f"adapter.head={head}", *pruning
    )
    assert list(t) == list(KEYS)
    # N: the backbone + a plain 512->102 classifier, not the 1000-class fc (19.25 Mbit, not 34)
    assert 32 * t["base_fp32_params"] + t["base_binary_params"] == FLOWERS_BASE_BITS == 19_250_368
    assert (t["introduced_fp32_params"], t["introduced_binary_params"]) == (introduced, 0)
    assert round(t["size_pct"], 1) == printed_pct


# CIFAR-100 80-20 on the STE net (thesis table 6.5): UDTA concat head, g = channels and g = 1
@pytest.mark.parametrize("groups, fp32, printed_pct", [("channels", 8_560, 6.1), (1, 174_160, 123.0)])
def test_cifar100_check_values(groups, fp32, printed_pct, make_cfg, tmp_path):
    t = thesis_summary(make_cfg, tmp_path, "+experiment=cifar80_20_udta", f"adapter.groups={groups}")
    assert (t["introduced_fp32_params"], t["introduced_binary_params"]) == (fp32, 6_410)
    assert (t["base_fp32_params"], t["base_binary_params"]) == (6_280, 4_328_560 + 320 * 20 + 20)
    # the thesis prints one decimal, rounded down: its own counts give 6.18 % where it prints 6.1
    assert math.floor(10 * t["size_pct"]) / 10 == printed_pct


def test_half_bias_convention_and_what_a_plain_head_introduces():
    """The concat head counts its extra columns plus their share of the bias (the thesis's 'half of the
    concat head'), rounded down for an odd class count; a plain head introduces nothing, finetuning a base."""
    reactnet = ReActNet18(width=0.25)
    for classes in (102, 37):
        concat, adapter = Parallel(reactnet, classes, head="concat"), Parallel(reactnet, classes, head="adapter")
        extra = thesis_counts(concat)["introduced_fp32_params"] - thesis_counts(adapter)["introduced_fp32_params"]
        assert extra == 128 * classes + classes // 2  # width 0.25: 128 extra features
    ste = STEResNetCIFAR(num_classes=5, width=0.25)
    assert thesis_counts(HeadOnly(ste, 5))["size_pct"] == 0.0
    finetune = thesis_counts(FullFinetune(ste, 5))
    assert finetune["size_pct"] == 100.0 and finetune["introduced_binary_params"] == finetune["base_binary_params"]
    # our own convention (summarize's top level) still counts the whole new head
    assert summarize(HeadOnly(ste, 5))["head_binary_params"] == 80 * 5 + 5


def test_table_6_2_slip_is_not_copied():
    """Table 6.2 prints 135,025 for three g=1 serial adapters: 1,615 (a 5- vs 10-class head) too few."""
    torch.manual_seed(0)
    t = thesis_counts(Serial(STEResNetCIFAR(num_classes=5), 5, stages=[1, 2, 3], groups=1))
    assert t["introduced_fp32_params"] == 4 * (80 + 160 + 320) + 80**2 + 160**2 + 320**2 == 135_025 + 1_615


def test_table_6_7_divides_by_the_pets_base_not_the_flowers_one():
    pets = Parallel(ReActNet18(), 37, head="adapter")
    fp32, binary = deployed_base(pets)
    assert 32 * fp32 + binary == 18_183_328 != FLOWERS_BASE_BITS
    t = thesis_counts(pets)
    assert t["introduced_fp32_params"] == 447_552
    assert round(t["size_pct"], 1) == 78.8  # the thesis prints 74.4: the Flowers-102 base's denominator
    assert round(100 * 32 * 447_552 / FLOWERS_BASE_BITS, 1) == 74.4
