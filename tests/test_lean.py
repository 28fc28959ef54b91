"""Memory-lean backprop (memory=lean, docs/speed.md): gradients equal standard
autograd's, and far fewer bytes are kept for backward.

Tolerances: every lean path of an adaptation strategy (frozen base) and of
``low_precision=False`` is exact, to the bit (``torch.equal``). With
``low_precision`` (memory=lean_fp16 in task=pretrain, full_finetune) BN (and ReActNet's approx-sign and
trainable PReLU) inputs are stored in float16: each parameter's gradient is
then within a relative L2 error of 5e-3 (STE net) / 1e-2 (ReActNet) of
standard autograd's (parameters whose gradient is analytically zero, like a
bias right before a training-mode BN, are left out: theirs is rounding noise).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_memory import SavedTensorMeter
from bnn_adapt import accounting
from bnn_adapt.adapters import STRATEGIES, Serial
from bnn_adapt.bases import ReActNet18, STEResNetCIFAR
from bnn_adapt.bases.reactnet import ChannelsLastMaxPool2d
from bnn_adapt.errors import ConfigError
from bnn_adapt.training.lean import (
    STANDARD_CLASSES,
    is_lean,
    make_lean,
    make_standard,
    pack_bits,
    set_memory_mode,
    trains_binary_network,
    unpack_bits,
    unpack_signs,
)
from tests.helpers.models import realistic_bn

LOW_PRECISION_RTOL = {"ste": 5e-3, "reactnet": 1e-2}
BASES = {
    "ste": (lambda: STEResNetCIFAR(num_classes=5, width=0.1), (6, 3, 16, 16)),
    # 64 px: at 32 the last stage is 1x1, and batch-statistics BN over 4 values is ill-conditioned
    "reactnet": (lambda: ReActNet18(num_classes=10, width=0.125), (4, 3, 64, 64)),
}


def build(base_kind: str, strategy: str, freeze_bn: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make_base, shape = BASES[base_kind]
    torch.manual_seed(0)
    base = realistic_bn(make_base())
    if strategy == "pretrain":
        model, classes = base, base.num_classes
    else:
        model, classes = STRATEGIES[strategy](base, 5, freeze_bn=freeze_bn), 5
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, classes, (shape[0],), generator=torch.Generator().manual_seed(2))
    return model.train(), x, y


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def standard_and_lean(base_kind, strategy, freeze_bn=True, low_precision=None):
    standard, x, y = build(base_kind, strategy, freeze_bn)
    lean = make_lean(copy.deepcopy(standard), low_precision=low_precision)
    out_s, grads_s = step(standard, x, y)
    out_l, grads_l = step(lean, x, y)
    return (standard, out_s, grads_s), (lean, out_l, grads_l)


CASES = [(b, s) for b in BASES for s in [*STRATEGIES, "pretrain"]]


# ---------------------------------------------------------------------------
# bit packing


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 8), (3, 17), (5, 3, 7, 3), (4, 80, 5, 5)])
def test_pack_bits_round_trip_and_size(shape):
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=generator) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape[0] == shape[0]  # the batch dimension stays
    assert packed.numel() == shape[0] * -(-mask[0].numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
    x = torch.randn(shape, generator=generator)
    x.view(-1)[0] = -0.0
    expected = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(pack_bits(x >= 0), x.shape, torch.float32), expected)


# ---------------------------------------------------------------------------
# gradients equal standard autograd's


@pytest.mark.parametrize("base_kind,strategy", CASES)
def test_lean_gradients_equal_standard(base_kind, strategy):
    """Exact for adaptation strategies; with low precision (pretrain, full finetune) within the stated tolerance."""
    (standard, out_s, grads_s), (lean, out_l, grads_l) = standard_and_lean(base_kind, strategy)
    assert is_lean(lean)
    assert torch.equal(out_s, out_l)
    assert grads_s.keys() == grads_l.keys() and grads_s
    buffers_l = dict(lean.named_buffers())
    for name, value in standard.named_buffers():  # BN running statistics move alike
        assert torch.equal(value, buffers_l[name]), name
    if not trains_binary_network(standard):
        for name in grads_s:
            assert torch.equal(grads_s[name], grads_l[name]), name
        return
    largest = max(g.norm() for g in grads_s.values())
    for name, g in grads_s.items():
        if g.norm() < 1e-6 * largest:  # analytically zero (a bias before a training-mode BN)
            continue
        error = ((grads_l[name] - g).norm() / g.norm()).item()
        assert error <= LOW_PRECISION_RTOL[base_kind], (name, error)


@pytest.mark.parametrize("base_kind", list(BASES))
@pytest.mark.parametrize("strategy", ["full_finetune", "pretrain"])
def test_lean_is_exact_when_the_base_trains(base_kind, strategy):
    """memory=lean: no low precision, bit-identical training."""
    standard, x, y = build(base_kind, strategy)
    lean = set_memory_mode(copy.deepcopy(standard), "lean")
    assert is_lean(lean) and not any(getattr(m, "lean_low_precision", False) for m in lean.modules())
    out_s, grads_s = step(standard, x, y)
    out_l, grads_l = step(lean, x, y)
    assert torch.equal(out_s, out_l)
    for name in grads_s:
        assert torch.equal(grads_s[name], grads_l[name]), name


@pytest.mark.parametrize("strategy", ["serial", "lora", "bitfit"])
def test_lean_is_exact_with_drifting_base_bn(strategy):
    """base.bn=adapt: base BN in training mode, gradients through it."""
    (_, out_s, grads_s), (_, out_l, grads_l) = standard_and_lean("ste", strategy, freeze_bn=False)
    assert torch.equal(out_s, out_l)
    for name in grads_s:
        assert torch.equal(grads_s[name], grads_l[name]), name


@pytest.mark.parametrize("base_kind", list(BASES))
@pytest.mark.parametrize("strategy", ["serial", "lora"])
def test_lean_is_exact_under_autocast(base_kind, strategy):
    """Mixed precision (trainer=gpu uses 16-mixed; here CPU bfloat16): lean matches standard to the bit."""
    standard, x, y = build(base_kind, strategy)
    lean = make_lean(copy.deepcopy(standard))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s, grads_s = step(standard, x, y)
        out_l, grads_l = step(lean, x, y)
    assert torch.equal(out_s, out_l)
    for name in grads_s:
        assert torch.equal(grads_s[name], grads_l[name]), name


def test_lean_training_steps_stay_identical():
    """Several Adam steps of serial adapters: standard and lean stay bit-identical."""
    standard, x, y = build("ste", "serial")
    lean = make_lean(copy.deepcopy(standard))
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (standard, lean)]
    for _ in range(3):
        for model, optimizer in zip((standard, lean), optimizers, strict=True):
            step(model, x, y)
            optimizer.step()
    for (name, a), b in zip(standard.state_dict().items(), lean.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------
# what is saved for backward


def saved(model: nn.Module, x: torch.Tensor, y: torch.Tensor, base: nn.Module | None = None):
    meter = SavedTensorMeter(model, x.shape[0], base=base)
    with meter.measuring():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return meter.saved


@pytest.mark.parametrize("base_kind", list(BASES))
@pytest.mark.parametrize("strategy", ["udta", "head_only"])
def test_parallel_and_head_only_keep_nothing_of_the_base(base_kind, strategy):
    model, x, y = build(base_kind, strategy)
    for memory in ("standard", "lean"):
        set_memory_mode(model, memory)
        assert saved(model, x, y, base=model.base).activation_base == 0


def test_serial_lean_keeps_far_less_of_the_frozen_base():
    model, x, y = build("ste", "serial")
    standard = saved(model, x, y, base=model.base)
    lean = saved(make_lean(model), x, y, base=model.base)
    assert standard.activation_base >= 20 * lean.activation_base > 0
    assert standard.activation >= 3 * lean.activation
    assert all(p.grad is None for p in model.base.parameters())  # no weight gradients for frozen layers


@pytest.mark.parametrize("memory", ["standard", "lean"])
def test_serial_keeps_nothing_before_the_first_adapter(memory):
    torch.manual_seed(0)
    base = STEResNetCIFAR(num_classes=5, width=0.1)
    model = set_memory_mode(Serial(base, 5, stages=[2]).train(), memory)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    before = nn.ModuleList([base.stem, base.stages[0], base.stages[1]])  # stage 2 feeds the first adapter
    assert saved(model, x, y, base=before).activation_base == 0
    assert saved(model, x, y, base=base.stages[2]).activation_base > 0


@pytest.mark.parametrize("base_kind", list(BASES))
def test_lean_pretraining_keeps_at_least_three_times_less(base_kind):
    model, x, y = build(base_kind, "pretrain")
    standard = saved(model, x, y)
    lean = saved(set_memory_mode(model, "lean_fp16"), x, y)
    exact = saved(set_memory_mode(model, "lean"), x, y)
    assert standard.activation >= (5 if base_kind == "ste" else 1.5) * lean.activation
    assert standard.activation >= (3 if base_kind == "ste" else 1.1) * exact.activation


def test_frozen_binary_conv_saves_no_input():
    from bnn_adapt.nn.layers import BinaryConv2d

    conv = make_lean(BinaryConv2d(8, 8, 3, padding=1, bias=False)).requires_grad_(False)
    x = (torch.rand(4, 8, 6, 6) * 2 - 1).requires_grad_()  # within [-1, 1]: the STE mask is all ones
    meter = SavedTensorMeter(conv, 4)
    with meter.measuring():
        out = conv(x)
    assert meter.saved.activation == 0
    out.sum().backward()
    assert conv.weight.grad is None and x.grad is not None


# ---------------------------------------------------------------------------
# low-precision storage


@pytest.mark.parametrize("training", [True, False])
def test_float16_bn_storage_is_accurate_even_when_the_mean_dwarfs_the_spread(training):
    """BN keeps ``x - mean`` (not x) in float16: a large common offset costs no accuracy."""
    bn = realistic_bn(nn.BatchNorm2d(4)).train(training)
    x = (1000 + torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(0))).requires_grad_()
    lean = make_lean(copy.deepcopy(bn), low_precision=True)
    g = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    bn(x).backward(g)
    expected, expected_w, x.grad = x.grad, bn.weight.grad, None
    out = lean(x)
    out.backward(g)
    assert torch.equal(out, bn(x.detach()) if not training else out)
    assert ((x.grad - expected).norm() / expected.norm()).item() < 1e-3
    assert ((lean.weight.grad - expected_w).norm() / expected_w.norm()).item() < 1e-3
    assert torch.equal(bn.running_var, lean.running_var) and lean.num_batches_tracked == bn.num_batches_tracked


def test_approx_sign_float16_derivative_error_bound():
    from bnn_adapt.bases.reactnet import ApproxSignActivation

    x = torch.linspace(-1.5, 1.5, 3001, requires_grad=True)
    ApproxSignActivation()(x).sum().backward()
    expected, x.grad = x.grad, None
    make_lean(ApproxSignActivation(), low_precision=True)(x).sum().backward()
    assert 0 < (x.grad - expected).abs().max() <= 2**-10


# ---------------------------------------------------------------------------
# switching


def test_make_lean_keeps_state_dict_accounting_and_switches_back():
    model, x, _ = build("reactnet", "serial")
    state, summary = copy.deepcopy(model.state_dict()), accounting.summarize(model)
    make_lean(model)
    assert is_lean(model)
    assert {type(m) for m in model.modules()} & set(STANDARD_CLASSES)
    assert list(model.state_dict()) == list(state)
    assert accounting.summarize(model) == summary
    copy.deepcopy(model)(x)  # still a plain, copyable nn.Module
    make_standard(model)
    assert not is_lean(model)
    assert not any(hasattr(m, "lean_low_precision") for m in model.modules())


def test_make_lean_leaves_unknown_subclasses_alone():
    from bnn_adapt.nn.layers import BinaryConv2d

    class Custom(BinaryConv2d):
        pass

    conv = make_lean(Custom(4, 4, 3))
    assert type(conv) is Custom


def test_memory_mode_is_validated():
    with pytest.raises(ConfigError, match="memory"):
        set_memory_mode(nn.Linear(2, 2), "tiny")


def test_lean_run_end_to_end(make_cfg, pretrained_base):
    from bnn_adapt.run.task import run

    metrics = run(make_cfg("data=cifar5_5", "adapter=serial", "memory=lean", "trainer.max_epochs=1"))
    assert metrics["status"] == "complete" and metrics["test_top1"] is not None
    assert metrics["config"]["memory"] == "lean"


def test_invalid_memory_setting_is_a_config_error(make_cfg):
    from bnn_adapt.run.task import run

    with pytest.raises(ConfigError, match="memory"):
        run(make_cfg("data=cifar5_5", "memory=half"))


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, 2, 1, dilation=2),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        ChannelsLastMaxPool2d(3, 2, 1),
        nn.AvgPool2d(2, 2),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    ],
)
def test_lean_pooling_is_exact_and_keeps_at_most_a_byte_per_output(pool):
    x = torch.randn(3, 4, 13, 13, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = pool(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    expected, x.grad = x.grad, None
    lean = make_lean(copy.deepcopy(pool))
    meter = SavedTensorMeter(lean, 3)
    with meter.measuring():
        out_lean = lean(x)
    out_lean.backward(g)
    assert torch.equal(out, out_lean) and torch.equal(x.grad, expected)
    assert meter.saved.activation <= out.numel()


def test_frozen_fp32_conv_keeps_nothing_and_a_trainable_one_keeps_float16():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    for trains, low_precision, expected_bytes in [(False, False, 0), (True, True, x.numel() * 2)]:
        lean = make_lean(copy.deepcopy(conv), low_precision=low_precision).requires_grad_(trains)
        meter = SavedTensorMeter(lean, 3)
        with meter.measuring():
            out = lean(x)
        assert meter.saved.activation == expected_bytes
        out.sum().backward()
        reference = copy.deepcopy(conv).requires_grad_(trains)
        x_ref = x.detach().clone().requires_grad_()
        reference(x_ref).sum().backward()
        assert torch.equal(x.grad, x_ref.grad)
        if trains:
            assert ((lean.weight.grad - reference.weight.grad).norm() / reference.weight.grad.norm()) < 1e-3
        x.grad = None
