"""STE ResNet for CIFAR: exact per-layer parameter counts, binary vs
fp32 totals, the width multiplier and tiny forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnn_adapt.accounting import parameter_rows, totals
from bnn_adapt.bases.ste_resnet import BasicBlock, STEResNetCIFAR
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear


@pytest.fixture(scope="module")
def full() -> STEResNetCIFAR:
    return STEResNetCIFAR(num_classes=10, width=1.0)


def counts(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters()}


def bn2d(prefix: str, c: int) -> dict[str, int]:
    return {f"{prefix}.weight": c, f"{prefix}.bias": c}


def expected_full_counts() -> dict[str, int]:
    """Every parameter tensor of the C = 10 net, from its architecture table (docs/concepts.md, Bases)."""
    e = {"stem.0.weight": 2_160, **bn2d("stem.1", 80)}
    # stage 1: 4 convs of 80 channels
    for b in (0, 1):
        for k in (1, 2):
            e[f"stages.0.{b}.conv{k}.weight"] = 57_600
            e.update(bn2d(f"stages.0.{b}.bn{k}", 80))
    # stage 2
    e["stages.1.0.conv1.weight"] = 115_200
    e["stages.1.0.conv2.weight"] = 230_400
    e["stages.1.1.conv1.weight"] = 230_400
    e["stages.1.1.conv2.weight"] = 230_400
    e["stages.1.0.shortcut.0.weight"] = 12_800
    e.update(bn2d("stages.1.0.shortcut.1", 160))
    # stage 3
    e["stages.2.0.conv1.weight"] = 460_800
    e["stages.2.0.conv2.weight"] = 921_600
    e["stages.2.1.conv1.weight"] = 921_600
    e["stages.2.1.conv2.weight"] = 921_600
    e["stages.2.0.shortcut.0.weight"] = 51_200
    e.update(bn2d("stages.2.0.shortcut.1", 320))
    for s, c in ((1, 160), (2, 320)):
        for b in (0, 1):
            for k in (1, 2):
                e.update(bn2d(f"stages.{s}.{b}.bn{k}", c))
    # head
    e.update({"feature_norm.weight": 320, "feature_norm.bias": 320})  # BN1d(320): 640
    e.update({"classifier.0.weight": 3_200, "classifier.0.bias": 10})  # linear: 3,210
    e.update({"classifier.1.weight": 10, "classifier.1.bias": 10})  # BN1d(10): 20
    return e


def test_per_layer_parameter_counts_match_spec(full):
    assert counts(full) == expected_full_counts()


def test_layer_kinds_and_shapes(full):
    stem = full.stem[0]
    assert isinstance(stem, BinaryConv2d) and not stem.binarize_input
    assert tuple(stem.weight.shape) == (80, 3, 3, 3) and stem.padding == (1, 1)
    assert isinstance(full.stem[1], nn.BatchNorm2d) and isinstance(full.stem[2], nn.Hardtanh)
    for s, (c, stride) in enumerate(((80, 1), (160, 2), (320, 2))):
        stage = full.stages[s]
        assert len(stage) == 2
        first, second = stage
        assert isinstance(first, BasicBlock) and isinstance(second, BasicBlock)
        assert first.conv1.stride == (stride, stride) and second.conv1.stride == (1, 1)
        for conv in (first.conv1, first.conv2, second.conv1, second.conv2):
            assert isinstance(conv, BinaryConv2d) and conv.binarize_input and conv.bias is None
            assert conv.out_channels == c and conv.kernel_size == (3, 3)
        assert second.shortcut is None
        if s == 0:
            assert first.shortcut is None
        else:
            sc_conv, sc_bn = first.shortcut
            assert isinstance(sc_conv, BinaryConv2d) and sc_conv.kernel_size == (1, 1)
            assert sc_conv.stride == (2, 2) and sc_conv.bias is None and isinstance(sc_bn, nn.BatchNorm2d)
    assert isinstance(full.feature_norm, nn.BatchNorm1d) and full.feature_norm.num_features == 320
    lin, bn = full.classifier
    assert isinstance(lin, BinaryLinear) and (lin.in_features, lin.out_features) == (320, 10)
    assert lin.bias is not None
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 10


def test_binary_and_fp32_totals(full):
    e = expected_full_counts()
    binary_keys = [k for k in e if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    binary_keys += ["stem.0.weight", "stages.1.0.shortcut.0.weight", "stages.2.0.shortcut.0.weight"]
    binary_keys += ["classifier.0.weight", "classifier.0.bias"]
    n_bin = sum(e[k] for k in binary_keys)
    n_fp32 = sum(e.values()) - n_bin
    # by hand from the architecture table
    convs = 2_160 + 4 * 57_600 + 115_200 + 3 * 230_400 + 12_800 + 460_800 + 3 * 921_600 + 51_200
    assert n_bin == convs + 3_210 == 4_331_770
    bn = 2 * 80 * (1 + 4) + 2 * 160 * (4 + 1) + 2 * 320 * (4 + 1)
    assert n_fp32 == bn + 640 + 20 == 6_260

    rows = parameter_rows(full)
    assert totals(rows) == (n_fp32, n_bin)
    kinds = {r.name: r.kind for r in rows}
    for k in e:
        assert kinds[k] == ("binary" if k in binary_keys else "fp32"), k
    # running statistics are buffers and not counted
    assert sum(r.params for r in rows) == sum(p.numel() for p in full.parameters())


def test_num_classes_changes_only_the_head():
    net = STEResNetCIFAR(num_classes=7, width=1.0)
    c = counts(net)
    assert c["classifier.0.weight"] == 320 * 7 and c["classifier.0.bias"] == 7
    assert c["classifier.1.weight"] + c["classifier.1.bias"] == 14
    fp32, binary = totals(parameter_rows(net))
    assert (fp32, binary) == (6_260 - 20 + 14, 4_331_770 - 3_210 + 321 * 7)


@pytest.mark.parametrize(
    "width, channels", [(0.1, [8, 16, 32]), (0.25, [20, 40, 80]), (0.5, [40, 80, 160]), (1.0, [80, 160, 320])]
)
def test_width_multiplier_scales_channels(width, channels):
    net = STEResNetCIFAR(num_classes=5, width=width)
    assert net.stage_channels == channels
    c1, c2, c3 = channels
    assert net.stem[0].out_channels == c1
    assert [s[0].conv1.out_channels for s in net.stages] == channels
    assert net.stages[1][0].shortcut[0].weight.shape == (c2, c1, 1, 1)
    assert net.stages[2][0].shortcut[0].weight.shape == (c3, c2, 1, 1)
    assert net.classifier[0].weight.shape == (5, c3)
    assert net.feature_norm.num_features == c3
    _, binary = totals(parameter_rows(net))
    convs = 27 * c1 + 4 * 9 * c1 * c1  # stem, stage 1
    convs += 9 * c1 * c2 + 3 * 9 * c2 * c2 + c1 * c2  # stage 2 with its shortcut
    convs += 9 * c2 * c3 + 3 * 9 * c3 * c3 + c2 * c3  # stage 3 with its shortcut
    assert binary == convs + 5 * c3 + 5


def test_forward_at_tiny_width():
    torch.manual_seed(0)
    net = STEResNetCIFAR(num_classes=6, width=0.1).eval()
    x = torch.randn(4, 3, 32, 32)
    taps = net.stage_outputs(x)
    assert [tuple(t.shape) for t in taps] == [(4, 8, 32, 32), (4, 16, 16, 16), (4, 32, 8, 8)]
    logits = net(x)
    assert logits.shape == (4, 6) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, net.classifier(net.pre_classifier(taps[-1])))


def test_pre_classifier_is_pool_bn_hardtanh():
    torch.manual_seed(1)
    net = STEResNetCIFAR(num_classes=3, width=0.1).eval()
    with torch.no_grad():
        net.feature_norm.running_mean.uniform_(-0.2, 0.2)
        net.feature_norm.running_var.uniform_(0.01, 0.05)
    f3 = torch.rand(2, 32, 8, 8) * 2 - 1
    out = net.pre_classifier(f3)
    bn = net.feature_norm
    expected = ((f3.mean(dim=(2, 3)) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)) * bn.weight + bn.bias
    torch.testing.assert_close(out, expected.clamp(-1, 1))
    assert (out.abs() == 1).any()  # the clamp bites with this variance


def test_the_image_input_is_not_binarised_but_blocks_are():
    torch.manual_seed(2)
    net = STEResNetCIFAR(num_classes=3, width=0.1).eval()
    x = torch.rand(1, 3, 32, 32) * 0.5 + 0.1  # all positive: sign(x) would be all ones
    y = torch.rand(1, 3, 32, 32) * 0.5 + 0.1
    assert not torch.allclose(net.stem(x), net.stem(y))
    # a block sees only the signs of its input (the shortcut-free first block)
    block = net.stages[0][0]
    h = torch.randn(1, 8, 32, 32)
    scaled = h * torch.rand_like(h) * 0.9 + h.sign() * 0.05  # same signs, other magnitudes
    assert torch.equal(scaled.sign(), h.sign())
    a = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(h)))))
    b = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(scaled)))))
    torch.testing.assert_close(a, b)
    # ... but the identity shortcut adds the real input
    assert not torch.allclose(block(h), block(scaled))


def test_arch_config_round_trip():
    net = STEResNetCIFAR(num_classes=4, width=0.1)
    assert net.arch == "ste_resnet_cifar" and net.input_size == 32
    twin = STEResNetCIFAR(**net.arch_config())
    twin.load_state_dict(net.state_dict())
    assert counts(twin) == counts(net)


def hand_block(block: BasicBlock, x: torch.Tensor, clip_after_add: bool) -> torch.Tensor:
    """The STE ResNet's basic block written out: sign -> conv -> BN -> hardtanh, twice, + shortcut."""

    def bconv(conv, t):
        return nn.functional.conv2d(
            torch.where(t >= 0, 1.0, -1.0),
            torch.where(conv.weight >= 0, 1.0, -1.0),
            stride=conv.stride,
            padding=conv.padding,
        )

    h = nn.functional.hardtanh(block.bn1(bconv(block.conv1, x)))
    out = block.bn2(bconv(block.conv2, h))
    residual = x if block.shortcut is None else block.shortcut[1](bconv(block.shortcut[0], x))
    return nn.functional.hardtanh(out + residual) if clip_after_add else nn.functional.hardtanh(out) + residual


@pytest.mark.parametrize("block", ["thesis", "binarynet"])
def test_block_matches_the_written_out_block(block):
    torch.manual_seed(3)
    net = STEResNetCIFAR(num_classes=3, width=0.1, block=block).eval()
    x = torch.randn(2, 8, 32, 32) * 2
    for b in (net.stages[0][0], net.stages[1][0]):
        y = b(x)
        torch.testing.assert_close(y, hand_block(b, x, clip_after_add=block == "binarynet"))
        x = y


def test_thesis_block_is_the_default_and_leaves_stage_outputs_unclipped():
    torch.manual_seed(4)
    thesis = STEResNetCIFAR(num_classes=3, width=0.1).eval()
    assert thesis.block == "thesis" and thesis.arch_config()["block"] == "thesis"
    binarynet = STEResNetCIFAR(num_classes=3, width=0.1, block="binarynet").eval()
    binarynet.load_state_dict(thesis.state_dict())  # same parameters, another network
    x = torch.randn(2, 3, 32, 32)
    assert max(t.abs().max() for t in thesis.stage_outputs(x)) > 1  # taps carry the unclipped sum
    assert max(t.abs().max() for t in binarynet.stage_outputs(x)) <= 1


def test_unknown_block_is_a_config_error():
    from bnn_adapt.errors import ConfigError

    with pytest.raises(ConfigError, match="base.block='resnet'.*thesis, binarynet"):
        STEResNetCIFAR(block="resnet")
