"""Adapters and strategies: parameter formulas, forward maths,
channel plans, heads, group resolution and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.adapters import (
    STRATEGIES,
    UDTA,
    BitFit,
    FullFinetune,
    HeadOnly,
    LoRA,
    Parallel,
    Serial,
    SerialAdapter,
    ThinBlock,
    resolve_groups,
)
from bnn_adapt.adapters.udta import thin_block_shapes
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import BinaryLinear
from tests.helpers.models import randomize_bn


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def serial_formula(c: int, g: int) -> int:
    return 4 * c + c * c // g


def thin_formula(c_in: int, c_out: int, g: int) -> int:
    return c_in * (9 + 2) + c_in * c_out // g + 2 * c_out


def bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


# ---------------------------------------------------------------------------
# serial adapter


@pytest.mark.parametrize("c, g", [(8, 1), (16, 4), (80, 1), (80, 10), (80, 20), (160, 20), (320, 5), (320, 320)])
def test_serial_adapter_parameter_count(c, g):
    adapter = SerialAdapter(c, g)
    assert n_params(adapter) == serial_formula(c, g)
    assert adapter.pointwise.groups == g and adapter.pointwise.bias is None
    assert adapter.pointwise.kernel_size == (1, 1)


def test_serial_adapter_forward_formula():
    torch.manual_seed(0)
    adapter = SerialAdapter(6, groups=2)
    randomize_bn(adapter)
    adapter.eval()
    x = torch.randn(3, 6, 5, 5)
    conv = F.conv2d(bn_eval(x, adapter.norm_in), adapter.pointwise.weight, groups=2)
    # y = hardtanh(BN(conv1x1_g(BN(x)) + x)): the output BN sees the sum
    expected = F.hardtanh(bn_eval(conv + x, adapter.norm_out))
    with torch.no_grad():
        out = adapter(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape


# ---------------------------------------------------------------------------
# thin block and UDTA


@pytest.mark.parametrize(
    "c_in, c_out, g",
    [(8, 16, 1), (8, 16, 8), (16, 32, 4), (80, 160, 1), (80, 160, 10), (80, 160, 80), (320, 320, 20), (512, 512, 2)],
)
def test_thin_block_parameter_count(c_in, c_out, g):
    block = ThinBlock(c_in, c_out, g)
    assert n_params(block) == thin_formula(c_in, c_out, g)
    dw, pw = block.depthwise, block.pointwise
    assert dw.groups == c_in and dw.kernel_size == (3, 3) and dw.padding == (1, 1) and dw.bias is None
    assert (pw.in_channels, pw.out_channels, pw.groups) == (c_in, c_out, g) and pw.bias is None


def test_thin_block_forward_formula():
    torch.manual_seed(1)
    block = ThinBlock(4, 6, groups=2)
    randomize_bn(block, seed=1)
    block.eval()
    x = torch.randn(2, 4, 7, 7)
    h = F.relu(bn_eval(F.conv2d(x, block.depthwise.weight, padding=1, groups=4), block.depthwise_norm)) + x
    expected = bn_eval(F.conv2d(h, block.pointwise.weight, groups=2), block.pointwise_norm)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out < 0).any()  # no activation after the last BN


def test_udta_on_the_ste_channel_plan():
    plan = [80, 160, 320]
    assert thin_block_shapes(plan) == [(80, 160), (160, 320), (320, 320)]
    udta = UDTA(plan)
    expected = thin_formula(80, 160, 1) + thin_formula(160, 320, 1) + thin_formula(320, 320, 1)
    assert expected == 14_000 + 53_600 + 106_560
    assert n_params(udta) == expected
    assert udta.out_features == 320
    grouped = UDTA(plan, groups=[10, 20, 5])
    assert n_params(grouped) == thin_formula(80, 160, 10) + thin_formula(160, 320, 20) + thin_formula(320, 320, 5)


def test_udta_on_the_reactnet_channel_plan():
    plan = [64, 128, 256, 512]
    assert thin_block_shapes(plan) == [(64, 128), (128, 256), (256, 512), (512, 512)]
    udta = UDTA(plan, groups=4)
    expected = sum(thin_formula(ci, co, 4) for ci, co in [(64, 128), (128, 256), (256, 512), (512, 512)])
    assert n_params(udta) == expected
    assert udta.out_features == 512


def test_udta_forward_shape_from_fake_taps():
    torch.manual_seed(2)
    udta = UDTA([8, 16, 32])
    taps = [torch.randn(5, 8, 32, 32), torch.randn(5, 16, 16, 16), torch.randn(5, 32, 8, 8)]
    out = udta(taps)
    assert out.shape == (5, 32)


def test_udta_forward_formula():
    """a1 = pool(block1(f1)), a_k = pool(block_k(f_k + a_{k-1})), the last pool global."""
    torch.manual_seed(3)
    udta = UDTA([4, 6, 8], groups=[2, 1, 4])
    randomize_bn(udta, seed=3)
    udta.eval()
    f1, f2, f3 = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)
    b1, b2, b3 = udta.blocks
    with torch.no_grad():
        a1 = F.avg_pool2d(b1(f1), 2)
        a2 = F.avg_pool2d(b2(f2 + a1), 2)
        a3 = b3(f3 + a2).mean(dim=(2, 3))
        out = udta([f1, f2, f3])
    torch.testing.assert_close(out, a3)
    # each tap matters (the chain really carries a_{k-1} forward)
    with torch.no_grad():
        assert not torch.allclose(udta([f1 + 1, f2, f3]), out)
        assert not torch.allclose(udta([f1, f2 + 1, f3]), out)


# ---------------------------------------------------------------------------
# strategies on both bases


@pytest.fixture(scope="module")
def ste_full() -> STEResNetCIFAR:
    return STEResNetCIFAR(num_classes=10, width=1.0)


@pytest.fixture(scope="module")
def reactnet_full() -> ReActNet18:
    return ReActNet18(num_classes=1000, width=1.0)


STRATEGY_CASES = [
    ("head_only", HeadOnly, {}),
    ("full_finetune", FullFinetune, {}),
    ("serial_all", Serial, {"stages": [1, 2, 3]}),
    ("serial_last", Serial, {"stages": [3]}),
    ("serial_g2", Serial, {"stages": [1, 2], "groups": 2}),
    ("udta_concat", Parallel, {"head": "concat"}),
    ("udta_adapter", Parallel, {"head": "adapter", "groups": "channels"}),
]


@pytest.mark.parametrize("label, cls, kwargs", STRATEGY_CASES, ids=[c[0] for c in STRATEGY_CASES])
def test_strategies_on_tiny_ste_give_logits(label, cls, kwargs):
    torch.manual_seed(4)
    model = cls(STEResNetCIFAR(num_classes=10, width=0.1), 3, **kwargs)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    head_grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in head_grads)
    base_grads = [p.grad for p in model.base.parameters() if p.grad is not None]
    if cls is FullFinetune:
        assert base_grads
        assert all(p.requires_grad for p in model.base.parameters())
    else:
        assert not base_grads  # the base never learns
        assert not any(p.requires_grad for p in model.base.parameters())
        assert not model.base.training  # freeze_bn=True by default
    if model.adapter is not None and cls is not FullFinetune:
        assert all(p.grad is not None for p in model.adapter.parameters())


@pytest.mark.parametrize("label, cls, kwargs", STRATEGY_CASES, ids=[c[0] for c in STRATEGY_CASES])
def test_strategies_on_tiny_reactnet_give_logits(label, cls, kwargs):
    torch.manual_seed(5)
    if cls is Serial:
        kwargs = {**kwargs, "stages": [*kwargs["stages"], 4]}
    model = cls(ReActNet18(num_classes=10, width=0.125), 4, **kwargs).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_serial_adapters_sit_after_the_chosen_stages():
    base = STEResNetCIFAR(num_classes=10, width=0.1)
    model = Serial(base, 3, stages=[3, 1]).eval()
    assert model.stages == [1, 3] and sorted(model.adapter.keys()) == ["1", "3"]
    assert model.adapter["1"].pointwise.in_channels == 8 and model.adapter["3"].pointwise.in_channels == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = base.stem(x)
        h = model.adapter["1"](base.stages[0](h))
        h = base.stages[1](h)
        h = model.adapter["3"](base.stages[2](h))
        expected = model.head(base.pre_classifier(h))
        torch.testing.assert_close(model(x), expected)


def test_parallel_forward_composes_base_taps_and_adapter():
    torch.manual_seed(6)
    base = STEResNetCIFAR(num_classes=10, width=0.1)
    concat = Parallel(base, 3, head="concat").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = base.stage_outputs(x)
        vector = concat.adapter(taps)
        expected = concat.head(torch.cat([base.pre_classifier(taps[-1]), vector], dim=1))
        torch.testing.assert_close(concat(x), expected)
        only = Parallel(base, 3, head="adapter").eval()
        torch.testing.assert_close(only(x), only.head(only.adapter(taps)))


def test_parallel_rejects_unknown_head():
    with pytest.raises(ConfigError, match="concat"):
        Parallel(STEResNetCIFAR(width=0.1), 3, head="both")


def test_strategy_registry():
    assert STRATEGIES == {
        "head_only": HeadOnly,
        "full_finetune": FullFinetune,
        "serial": Serial,
        "udta": Parallel,
        "lora": LoRA,
        "bitfit": BitFit,
    }


# ---------------------------------------------------------------------------
# heads at full width


def assert_binary_head(head: nn.Module, in_features: int, c: int) -> None:
    assert isinstance(head, nn.Sequential) and len(head) == 2
    lin, bn = head
    assert isinstance(lin, BinaryLinear) and (lin.in_features, lin.out_features) == (in_features, c)
    assert lin.bias is not None
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == c


def test_ste_heads_at_full_width(ste_full):
    assert_binary_head(HeadOnly(ste_full, 7).head, 320, 7)
    assert_binary_head(FullFinetune(ste_full, 7).head, 320, 7)
    assert_binary_head(Serial(ste_full, 7, stages=[3]).head, 320, 7)
    assert_binary_head(Parallel(ste_full, 7, head="concat").head, 640, 7)
    assert_binary_head(Parallel(ste_full, 7, head="adapter").head, 320, 7)
    udta = Parallel(ste_full, 7).adapter
    assert [(b.depthwise.in_channels, b.pointwise.out_channels) for b in udta.blocks] == [
        (80, 160),
        (160, 320),
        (320, 320),
    ]


def test_reactnet_heads_at_full_width(reactnet_full):
    concat = Parallel(reactnet_full, 37, head="concat").head
    assert type(concat) is nn.Linear and (concat.in_features, concat.out_features) == (1024, 37)
    assert concat.bias is not None
    adapter = Parallel(reactnet_full, 37, head="adapter").head
    assert type(adapter) is nn.Linear and (adapter.in_features, adapter.out_features) == (512, 37)
    head_only = HeadOnly(reactnet_full, 37).head
    assert type(head_only) is nn.Linear and (head_only.in_features, head_only.out_features) == (512, 37)


# ---------------------------------------------------------------------------
# groups and config errors


def test_resolve_groups_channels_means_c_in():
    assert resolve_groups("channels", 80, 160) == 80
    assert resolve_groups("channels", 320, 320) == 320
    assert resolve_groups(10, 80, 160) == 10
    assert resolve_groups(1, 7, 5) == 1


@pytest.mark.parametrize("groups", [3, 7, 0, -2, 160, True, "ten", 2.0])
def test_resolve_groups_rejects_non_dividing_values_and_lists_valid_ones(groups):
    with pytest.raises(ConfigError) as info:
        resolve_groups(groups, 80, 160)
    message = str(info.value)
    assert "[1, 2, 4, 5, 8, 10, 16, 20, 40, 80]" in message
    assert "channels" in message


def test_strategies_raise_config_error_for_bad_groups():
    base = STEResNetCIFAR(width=0.1)  # 8/16/32 channels
    with pytest.raises(ConfigError, match=r"\[1, 2, 4, 8\]"):
        Serial(base, 3, stages=[1], groups=3)
    with pytest.raises(ConfigError, match=r"\[1, 2, 4, 8\]"):
        Parallel(base, 3, groups=16)  # 8 -> 16 block: 16 does not divide 8
    # 'channels' works on every block of both plans
    grouped = Parallel(base, 3, groups="channels")
    assert [b.pointwise.groups for b in grouped.adapter.blocks] == [8, 16, 32]
    assert [a.pointwise.groups for a in Serial(base, 3, groups="channels").adapter.values()] == [8, 16, 32]


@pytest.mark.parametrize("stages", [[4], [0], [1, 5], []])
def test_serial_with_a_stage_the_base_lacks_raises(stages):
    with pytest.raises(ConfigError, match="1..3"):
        Serial(STEResNetCIFAR(width=0.1), 3, stages=stages)


def test_serial_stage_four_is_valid_only_on_reactnet():
    with pytest.raises(ConfigError):
        Serial(STEResNetCIFAR(width=0.1), 3, stages=[4])
    model = Serial(ReActNet18(num_classes=10, width=0.125), 3, stages=[4])
    assert list(model.adapter.keys()) == ["4"]
