"""Operation counts (bnn_adapt.accounting.operations): MACs per image, binary and fp32, checked by
hand for a small conv stack, for each adapter's own layers, for pruned adapters, and for the
full-width bases as docs/concepts.md reports them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bnn_adapt.accounting import summarize
from bnn_adapt.accounting.operations import mac_rows, mac_table, mac_totals, operation_counts
from bnn_adapt.adapters import HeadOnly, LoRA, Parallel, Serial
from bnn_adapt.bases import ReActNet18, STEResNetCIFAR
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear, ColumnPrunedLinear
from bnn_adapt.training.pruning import PruningPlan

PAGE = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"  # its operation counts (MACs) section


def conv_stack() -> nn.Sequential:
    """Real-input binary-weight stem, a binary conv with stride 2, a grouped fp32 1x1 conv, a binary linear."""
    return nn.Sequential(
        BinaryConv2d(3, 4, 3, padding=1, bias=False, binarize_input=False),  # STE stem: the image stays real
        nn.BatchNorm2d(4),
        nn.Hardtanh(),
        BinaryConv2d(4, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1, groups=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        BinaryLinear(8, 5),
    )


def test_small_conv_stack_counted_by_hand():
    counts = operation_counts(conv_stack(), image_size=8)
    by_layer = {r["name"]: (r["kind"], r["macs"]) for r in counts["macs_per_layer"]}
    assert by_layer == {
        "0": ("fp32", 8 * 8 * 4 * 3 * 3 * 3),  # 64 positions x 108 weights: real input, so no XNOR
        "1": ("fp32", 4 * 8 * 8),  # BN: one multiply-add per output value
        "3": ("binary", 4 * 4 * 8 * 4 * 3 * 3),  # stride 2: 16 positions x 288 weights
        "4": ("fp32", 8 * 4 * 4),
        "5": ("fp32", 4 * 4 * 8 * (8 // 2)),  # 2 groups: each output reads 4 input channels
        "8": ("binary", 8 * 5),
    }  # hardtanh, pooling and flatten do no MACs
    binary, fp32 = 4608 + 40, 6912 + 256 + 128 + 512
    assert (counts["macs_binary"], counts["macs_fp32"]) == (binary, fp32)
    assert counts["binary_mac_share"] == pytest.approx(binary / (binary + fp32))
    assert "adapter_macs" not in counts  # a bare network introduces nothing


def test_counting_leaves_the_model_as_it_was():
    model = Parallel(STEResNetCIFAR(num_classes=5, width=0.1), num_classes=5, head="concat")
    model.train()  # a frozen base stays in eval mode (base.bn=frozen), the adapter trains
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    operation_counts(model, 32)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # BN statistics untouched
    assert not any(m._forward_hooks for m in model.modules())


def stage_sizes(base, image_size: int = 32) -> list[int]:
    return [image_size >> i for i in range(len(base.stage_channels))]  # STE: 32, 16, 8


@pytest.mark.parametrize("groups", [1, 2])
def test_serial_adapter_macs_by_hand(groups):
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    model = Serial(base, 5, stages=[1, 2, 3], groups=groups)
    counts = operation_counts(model, 32)
    # per stage: BN in, 1x1 conv (C*C/g weights at each of H*W positions), BN out
    expected = sum(
        h * h * (2 * c + c * c // groups) for c, h in zip(base.stage_channels, stage_sizes(base), strict=True)
    )
    assert counts["adapter_macs"] == expected
    # the new head: binary linear 32 -> 5 (binary MACs) + BN1d(5)
    assert counts["head_macs"] == 32 * 5 + 5
    rows = {r["name"]: r for r in counts["macs_per_layer"]}
    assert rows["head.0"]["kind"] == "binary" and rows["adapter.1.pointwise"]["kind"] == "fp32"


def test_udta_adapter_macs_by_hand_and_base_classifier_skipped():
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    model = Parallel(base, 5, head="concat")
    counts = operation_counts(model, 32)
    c, h = base.stage_channels, stage_sizes(base)
    blocks = [(c[0], c[1], h[0]), (c[1], c[2], h[1]), (c[2], c[2], h[2])]  # thin block k at tap k's size
    # depthwise 3x3 (9 per channel), its BN, the 1x1 conv, its BN
    expected = sum(s * s * (ci * 9 + ci + ci * co + co) for ci, co, s in blocks)
    assert counts["adapter_macs"] == expected == 497_664
    assert counts["head_macs"] == 2 * c[2] * 5 + 5  # concat head: [base ; adapter] features
    assert not any(r["name"].startswith("base.classifier") for r in counts["macs_per_layer"])  # never runs


def test_lora_branches_count_as_adapter_and_head_only_adds_nothing():
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    lora = operation_counts(LoRA(base, 5, rank=2, stages=[3]), 32)
    # stage 3 (8x8 outputs, 32 channels): each branch is down (k x k conv to rank r, the conv's stride) + up (1x1)
    branches = [(16, 3, 8), (32, 3, 8), (32, 3, 8), (32, 3, 8), (16, 1, 8)]  # (c_in, k, output side)
    expected = sum(s * s * (2 * ci * k * k + 2 * 32) for ci, k, s in branches)
    assert lora["adapter_macs"] == expected
    head_only = operation_counts(HeadOnly(STEResNetCIFAR(num_classes=5, width=0.1), 5), 32)
    assert head_only["adapter_macs"] == 0


def test_pruned_weights_do_no_work():
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    model = Parallel(base, 5, head="adapter")
    dense = operation_counts(model, 32)["adapter_macs"]
    plan = PruningPlan(depthwise_rate=0.5, pointwise_rate=0.5, epochs=(1,))
    plan.prepare(model)
    plan.apply(model)
    pruned = summarize(model, image_size=32)
    c, h = base.stage_channels, stage_sizes(base)
    blocks = [(c[0], c[1], h[0]), (c[1], c[2], h[1]), (c[2], c[2], h[2])]
    # half the depthwise filters gone (9 MACs per position each), half the 1x1 weights zero; BNs still run
    expected = sum(
        s * s * (9 * (ci - round(0.5 * ci)) + ci + (ci * co - round(0.5 * ci * co)) + co) for ci, co, s in blocks
    )
    assert pruned["adapter_macs"] == expected < dense


def test_column_pruned_head_counts_kept_columns():
    head = ColumnPrunedLinear.wrap(nn.Linear(10, 3))
    head.kept_columns[:4] = False
    rows = mac_rows(nn.Sequential(nn.Flatten(), head), image_size=1, channels=10)
    assert [(r.kind, r.macs) for r in rows] == [("fp32", 6 * 3)]


FULL_WIDTH = {  # (macs_binary, macs_fp32) for one image at the base's own size; also on the page
    "ste_resnet_cifar": (655_363_200, 2_928_970),
    "reactnet18": (1_676_279_808, 140_277_248),
}


def test_full_width_bases_as_the_readme_reports_them():
    ste = mac_totals(mac_rows(STEResNetCIFAR(num_classes=10), 32), adapted=False)
    # STE ResNet by hand: 80-ch convs at 32x32; 160-ch at 16x16 (+ 1x1 shortcut); 320-ch at 8x8 (+ shortcut); head
    binary = 4 * 1024 * 80 * 720 + 256 * 160 * (720 + 3 * 1440 + 80) + 64 * 320 * (1440 + 3 * 2880 + 160) + 320 * 10
    stem = 1024 * 80 * 27  # binary weights on the real image: fp32 MACs
    bn = 5 * 1024 * 80 + 5 * 256 * 160 + 5 * 64 * 320 + 320 + 10  # every BN: stem, blocks, shortcuts, head
    assert (ste["macs_binary"], ste["macs_fp32"]) == (binary, stem + bn) == FULL_WIDTH["ste_resnet_cifar"]
    parts = [stem, bn - 330]  # the page's breakdown of the fp32 MACs

    react = mac_totals(mac_rows(ReActNet18(num_classes=1000), 224), adapted=False)
    stem, downsample = 112 * 112 * 64 * 147, 28 * 28 * 128 * 64 + 14 * 14 * 256 * 128 + 7 * 7 * 512 * 256
    # BN: the stem's, one per block, one per downsample shortcut (stages 2-4)
    bn = 64 * 112 * 112 + sum(c * s * s * (4 + (c > 64)) for c, s in ((64, 56), (128, 28), (256, 14), (512, 7)))
    binary = sum(4 * s * s * c * c * 9 for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))) - sum(
        s * s * c * (c // 2) * 9 for c, s in ((128, 28), (256, 14), (512, 7))
    )  # first block of stages 2-4: c/2 in
    assert react["macs_binary"] == binary
    assert react["macs_fp32"] == stem + downsample + bn + 512 * 1000  # + the fp32 head
    assert (react["macs_binary"], react["macs_fp32"]) == FULL_WIDTH["reactnet18"]
    parts += [stem, downsample, bn]

    page = PAGE.read_text()
    for count in [*(n for pair in FULL_WIDTH.values() for n in pair), *parts]:
        assert f"{count:,}" in page, f"{PAGE.name}'s operation counts are out of date: {count:,} missing"


def test_summary_only_reports_operation_counts(make_cfg):
    from bnn_adapt.run import task

    cfg = make_cfg("summary_only=true")
    summary = task.run(cfg)
    for key in ("macs_binary", "macs_fp32", "binary_mac_share", "adapter_macs", "head_macs", "macs_per_layer"):
        assert key in summary, key
    layers = summary["macs_per_layer"]
    assert sum(r["macs"] for r in layers if r["kind"] == "binary") == summary["macs_binary"]
    assert sum(r["macs"] for r in layers if r["part"] == "adapter") == summary["adapter_macs"] > 0
    assert summary["mac_image_size"] == cfg.data.image_size
    table = mac_table(summary)
    assert re.search(r"MACs per \d+x\d+ image: .* binary \+ .* fp32 \(\d+\.\d% binary\)", table)


ADAPTER_ROWS = {  # the page's table of what the thesis adapters add, by its (data, configuration) cells
    ("CIFAR-10 5-5", "head only"): ["+experiment=cifar5_5_head_only"],
    ("CIFAR-10 5-5", "serial, stages 1-3, g=1"): ["+experiment=cifar5_5_serial", "adapter.groups=1"],
    ("CIFAR-10 5-5", "serial, stages 1-3, g=20"): ["+experiment=cifar5_5_serial", "adapter.groups=20"],
    ("CIFAR-100 80-20", "udta concat, g=1"): ["+experiment=cifar80_20_udta"],
    ("CIFAR-100 80-20", "udta concat, g=channels"): ["+experiment=cifar80_20_udta", "adapter.groups=channels"],
    ("CIFAR-100 80-20", "udta concat, prune 0.9"): [
        "+experiment=cifar80_20_udta",
        "reduction=prune",
        "reduction.rate=0.9",
    ],
    ("CIFAR-100 80-20", "lora, rank 4, all stages"): ["+experiment=cifar80_20_udta", "adapter=lora"],
    ("Flowers-102 (ReActNet)", "head only"): ["+experiment=flowers102_head_only"],
    ("Flowers-102 (ReActNet)", "udta concat"): ["+experiment=flowers102_udta"],
    ("Flowers-102 (ReActNet)", "udta adapter head, prune 0.9"): [
        "+experiment=flowers102_udta",
        "adapter.head=adapter",
        "reduction=prune",
        "reduction.rate=0.9",
    ],
}


def test_documented_adapter_macs_are_what_summary_only_counts(tmp_path):
    from bnn_adapt.run.config import compose
    from bnn_adapt.run.counts import configured_counts

    cells = [
        line.strip("|").split("|")
        for line in PAGE.read_text().splitlines()
        if line.startswith("| ") and line.count("|") == 7
    ]
    rows = {(c[0].strip(), c[1].strip()): [v.strip() for v in c[2:]] for c in cells}
    for key, overrides in ADAPTER_ROWS.items():
        cfg = compose([*overrides, f"paths.base_dir={tmp_path}"], output_dir=tmp_path / "run")  # no base: random init
        _, s = configured_counts(cfg)
        expected = [
            f"{s.adapter_macs:,}",
            f"{s.head_macs:,}",
            f"{100 * s.binary_mac_share:.2f} %",
            f"{s.size_pct:.3f}",
        ]
        assert rows.get(key) == expected, f"{PAGE.name} row {key}"
