"""1-bit inference on packed kernels (issue #16): integer-exact binary convs at every
dispatch level, zero padding that contributes 0, BN + sign as an exact per-channel
interval, both bases and every adapter strategy against the float path, the base
kept in bits, the float fallback (no library: one warning line; the flag), and
``task=predict`` giving the same top-k on both paths. Timings live in the
benchmark (``make bench-infer``), never here."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.adapters.file import export_adapter
from bnn_adapt.bases.ste_resnet import BasicBlock, STEResNetCIFAR
from bnn_adapt.deploy import packed_kernels as kernels
from bnn_adapt.deploy.packed_base import repack, write_packed_base
from bnn_adapt.deploy.packed_blocks import PackedBasicBlock, sign_interval
from bnn_adapt.deploy.packed_inference import load_packed_base, use_packed_kernels, uses_packed_kernels
from bnn_adapt.deploy.packed_layers import PackedBinaryConv2d, PackedBinaryLayer
from bnn_adapt.deploy.predict import BaseWithAdapters
from bnn_adapt.nn.layers import BinaryConv2d
from bnn_adapt.nn.quantizers import sign
from bnn_adapt.run import task
from bnn_adapt.run.results import config_hash
from tests.helpers.files import write_images
from tests.helpers.models import adapted, make_base, randomize_bn, trained_like

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the packed kernels are not built here")
LEVELS = [pytest.param(level, marks=needs_kernels) for level in kernels.ISAS]


def at_level(level: str):
    if level not in kernels.supported():
        pytest.skip(f"this CPU does not run the {level} kernels")
    return kernels.forced_isa(level)


def signs(shape, gen) -> torch.Tensor:
    return torch.where(torch.randn(shape, generator=gen) >= 0, 1.0, -1.0)


# (batch, c_in, c_out, height, width, kernel, stride, conv pad, buffer pad)
CONV_SHAPES = [
    (1, 3, 20, 5, 5, 3, 1, 1, 1),
    (3, 20, 3, 4, 6, 3, 1, 1, 1),
    (2, 65, 130, 7, 6, 3, 2, 1, 1),
    (1, 130, 65, 9, 9, 1, 2, 0, 1),  # the shortcut reads the block's pad-1 buffer
    (2, 80, 80, 8, 8, 3, 1, 1, 1),
    (1, 33, 17, 5, 7, 3, 1, 0, 0),
    (2, 64, 128, 9, 9, 3, 2, 1, 2),
    (1, 20, 20, 1, 1, 3, 1, 1, 1),  # every tap but the centre is padding
]


@pytest.mark.parametrize("level", LEVELS)
def test_binary_conv_is_integer_exact_against_the_float_conv(level):
    gen = torch.Generator().manual_seed(0)
    with at_level(level):
        for n, c_in, c_out, h, w, k, stride, pad, buffer_pad in CONV_SHAPES:
            x, weight = signs((n, c_in, h, w), gen), signs((c_out, c_in, k, k), gen)
            expected = F.conv2d(x, weight, stride=stride, padding=pad)
            plan = kernels.ConvPlan(*kernels.pack_weights(weight >= 0), tuple(weight.shape), stride, pad)
            got = plan(kernels.pack_signs(x, buffer_pad))
            assert got.shape == expected.shape
            assert torch.equal(got, expected), (level, n, c_in, c_out, h, w, k, stride, pad)


@pytest.mark.parametrize("level", LEVELS)
def test_packing_reads_any_memory_layout_and_adds_the_bias_in_fp32(level):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 5, 19, generator=gen)
    x[0, :, 0, 0] = 0.0  # sign(0) = +1
    x[0, :, 0, 1] = -0.0
    bias = torch.randn(70, generator=gen)
    expected = sign(x + bias.view(1, -1, 1, 1))
    layouts = {
        "nchw": x,
        "nhwc": x.contiguous(memory_format=torch.channels_last),
        "strided": x.transpose(2, 3).contiguous().transpose(2, 3),  # neither channels nor pixels innermost
    }
    with at_level(level):
        words = {name: kernels.pack_signs(t, 2, bias) for name, t in layouts.items()}
    for name, packed in words.items():
        assert torch.equal(packed.to_signs(), expected), name
        assert torch.equal(packed.words, words["nchw"].words), name  # padding and unused bits zero too


@pytest.mark.parametrize("level", LEVELS)
def test_zero_padding_contributes_zero_not_minus_one(level):
    """All +1 inputs and weights: a corner of a 3x3 conv sees 4 taps, an edge 6, the inside 9."""
    c = 70
    ones = torch.ones(1, c, 4, 5)
    plan = kernels.ConvPlan(*kernels.pack_weights(torch.ones(3, c, 3, 3, dtype=torch.bool)), (3, c, 3, 3), 1, 1)
    with at_level(level):
        out = plan(kernels.pack_signs(ones, 1))[0, 0]
    assert out[0, 0] == 4 * c and out[0, 2] == 6 * c and out[1, 1] == 9 * c and out[3, 4] == 4 * c


@needs_kernels
def test_scaled_conv_is_the_integer_dot_times_the_channel_scale():
    """ReActNet's layer: the integer dot product is exact, then one rounding for the scale."""
    gen = torch.Generator().manual_seed(1)
    x, weight = signs((2, 65, 6, 6), gen), signs((130, 65, 3, 3), gen)
    scale = torch.rand(130, generator=gen) + 0.01
    layer = PackedBinaryConv2d(weight >= 0, 2, 1, scale)
    with torch.no_grad():
        got = layer(x)
    integer = F.conv2d(x, weight, stride=2, padding=1)
    assert torch.equal(got, integer * scale.view(1, -1, 1, 1))
    float_layer = F.conv2d(x, weight * scale.view(-1, 1, 1, 1), stride=2, padding=1)  # the float model's way
    assert torch.allclose(got, float_layer, rtol=1e-5, atol=1e-4)


def odd_batch_norm(c: int, gen) -> torch.nn.BatchNorm2d:
    """BN with positive, negative and zero gammas (zero with both signs of beta)."""
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.weight[:4] = 0.0
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.bias[:2], bn.bias[2:4] = 0.5, -0.5
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 20)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 50 + 0.1)
    return bn


@pytest.mark.parametrize("level", LEVELS)
def test_bn_then_sign_is_an_exact_integer_interval(level):
    """conv1 -> BN -> hardtanh -> sign written as bits equals the float layers' signs, element for element."""
    gen = torch.Generator().manual_seed(2)
    block = BasicBlock(20, 36, stride=2).eval()
    block.bn1 = odd_batch_norm(36, gen)
    x = torch.randn(3, 20, 9, 9, generator=gen)
    with torch.no_grad():
        expected = sign(block.act1(block.bn1(block.conv1(x))))
    use_packed_kernels(block)
    assert isinstance(block, PackedBasicBlock)
    with at_level(level), torch.no_grad():
        bits = block.fused_plans()[1](kernels.pack_signs(x, 1), out_pad=1)
    assert torch.equal(bits.to_signs(), expected)
    lo, hi = sign_interval(block.bn1, block.act1, 20 * 9)
    assert (lo[:2] == -180).all() and (hi[:2] == 180).all()  # gamma = 0, beta > 0: always +1
    assert (lo[2:4] > hi[2:4]).all()  # gamma = 0, beta < 0: never
    negative = block.bn1.weight < 0
    assert (lo[negative] == -180).all() and (hi[~negative & (block.bn1.weight != 0)] == 180).all()


def float_and_packed(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base as its packed file rebuilds it, on fp32 convs and on the kernels."""
    return repack(base)[0], use_packed_kernels(repack(base)[0])


def ste_base(block: str = "thesis", width: float = 0.25) -> STEResNetCIFAR:
    base = STEResNetCIFAR(num_classes=7, width=width, block=block)
    trained_like(base, 3)
    return base.eval()


@needs_kernels
@pytest.mark.parametrize("which", ["ste thesis", "ste binarynet", "reactnet"])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_bases_give_the_float_stage_outputs_and_logits(which, batch):
    if which == "reactnet":
        base, size = make_base("reactnet")
    else:
        base, size = ste_base(which.split()[1]), 32
    reference, packed = float_and_packed(base)
    assert uses_packed_kernels(packed) and not uses_packed_kernels(reference)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        for ours, theirs in zip(packed.stage_outputs(x), reference.stage_outputs(x), strict=True):
            # STE: integers exact, float parts with torch's own BN arithmetic; ReActNet's float
            # conv rounds each of its scale * (+-1) products, the kernel scales the exact integer once
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
        logits, expected = packed(x), reference(x)
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@needs_kernels
def test_every_dispatch_level_gives_the_same_outputs():
    for name in ("ste", "reactnet"):
        base, size = make_base(name)
        packed = use_packed_kernels(repack(base)[0])
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
        outputs = {}
        for level in kernels.supported():
            with kernels.forced_isa(level), torch.no_grad():
                outputs[level] = packed(x)
        assert all(torch.equal(out, outputs["portable"]) for out in outputs.values()), name


@needs_kernels
@pytest.mark.parametrize("name", ["ste", "reactnet"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_adapter_runs_on_the_packed_base(name, strategy, tmp_path):
    """Taps (udta), hooks (lora), substituted BN tensors (bitfit, BN drift) and weights (full_finetune)."""
    base, size = make_base(name)
    variant = "bn_drift" if strategy == "udta" else "plain"
    model = adapted(strategy, base, variant)
    write_packed_base(base, tmp_path / "base.bnnpack")
    export_adapter(model, tmp_path / "a.safetensors", reference_base=base, class_names=list("abcd"))
    banks = {packed: BaseWithAdapters.load(tmp_path / "base.bnnpack", packed=packed) for packed in (True, False)}
    for bank in banks.values():
        bank.attach(tmp_path / "a.safetensors")
    before = copy.deepcopy(banks[True].base.state_dict())
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(5))
    ours, theirs = banks[True](x), banks[False](x)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    after = banks[True].base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in banks[True].base.modules())


@needs_kernels
def test_folded_values_follow_substituted_bn_tensors():
    """A cached threshold or BN fold is rebuilt when a BN tensor is replaced or changed in place."""
    base = ste_base()
    reference, packed = float_and_packed(base)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        packed(x)  # fill the caches
        for model in (reference, packed):
            randomize_bn(model, 9)  # in place: new versions
        assert torch.allclose(packed(x), reference(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_packed_base_holds_its_binary_weights_as_bits():
    base = ste_base(width=0.5)
    reference, packed = float_and_packed(base)
    layers = [m for m in packed.modules() if isinstance(m, PackedBinaryLayer)]
    assert len(layers) == 3 * 2 * 2 + 2 + 1  # block convs, two shortcuts, the head's linear
    assert all(m.weight.is_meta for m in layers)
    float_bytes = sum(m.weight.numel() * 4 for m in layers)
    packed_bytes = sum(t.numel() * t.element_size() for m in layers for t in m.buffers() if not t.is_meta)
    assert packed_bytes * 8 < float_bytes
    # the state dict still reads as the float one (decoded on demand), so fingerprints and exports agree
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in packed.state_dict().items())


@needs_kernels
@pytest.mark.parametrize("name", ["ste", "reactnet"])
def test_a_file_loads_straight_onto_the_kernels(name, tmp_path):
    """No fp32 copy of the binary weights on the way: the same base as converting a float one."""
    base, size = make_base(name)
    write_packed_base(base, tmp_path / "base.bnnpack")
    loaded, header = load_packed_base(tmp_path / "base.bnnpack")
    converted = use_packed_kernels(repack(base)[0])
    assert header["arch"] == base.arch and uses_packed_kernels(loaded)
    assert all(not t.is_meta for k, t in loaded.named_buffers())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in converted.modules()]
    ours, theirs = loaded.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


@needs_kernels
def test_a_copied_or_pickled_packed_base_uses_its_own_tensors(tmp_path):
    base, size = make_base("reactnet")
    packed = use_packed_kernels(repack(base)[0])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = packed(x)  # fills the plan caches (raw pointers into packed's tensors)
        copied = copy.deepcopy(packed)
        torch.save(packed, tmp_path / "packed.pt")
        del packed
        assert torch.equal(copied(x), expected)
        assert torch.equal(torch.load(tmp_path / "packed.pt", weights_only=False)(x), expected)


@needs_kernels
def test_the_packed_base_is_for_inference():
    packed = use_packed_kernels(repack(ste_base())[0])
    with pytest.raises(RuntimeError, match="inference"):
        packed(torch.randn(1, 3, 32, 32, requires_grad=True))


def test_without_the_library_the_float_path_runs_after_one_warning_line(tmp_path, monkeypatch, caplog):
    base, size = make_base("ste")
    write_packed_base(base, tmp_path / "base.bnnpack")
    export_adapter(adapted("udta", base), tmp_path / "a.safetensors", reference_base=base, class_names=list("abcd"))
    x = torch.randn(4, 3, size, size)
    reference = BaseWithAdapters.load(tmp_path / "base.bnnpack", packed=False)
    reference.attach(tmp_path / "a.safetensors")
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "library_path", lambda: None)  # as if no compiler had built it
    with caplog.at_level(logging.WARNING):
        banks = [BaseWithAdapters.load(tmp_path / "base.bnnpack") for _ in range(2)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "float path" in warnings[0].getMessage()
    for bank in banks:
        assert not uses_packed_kernels(bank.base)
        bank.attach(tmp_path / "a.safetensors")
        assert torch.equal(bank(x), reference(x))


@needs_kernels
def test_the_flag_forces_the_float_path(tmp_path):
    base, _ = make_base("ste")
    write_packed_base(base, tmp_path / "base.bnnpack")
    assert uses_packed_kernels(BaseWithAdapters.load(tmp_path / "base.bnnpack").base)
    float_bank = BaseWithAdapters.load(tmp_path / "base.bnnpack", packed=False)
    assert not uses_packed_kernels(float_bank.base)
    assert not any(isinstance(m, PackedBinaryLayer) for m in float_bank.base.modules())


def test_the_flag_leaves_config_hashes_as_they_were(make_cfg):
    """predict.packed never changes what a run computes: finished runs stay complete."""
    cfg = make_cfg()
    with_flag = config_hash(cfg)
    with open_dict(cfg):
        del cfg.predict.packed
    assert config_hash(cfg) == with_flag


@needs_kernels
@pytest.mark.parametrize("name", ["ste", "reactnet"])
def test_task_predict_gives_the_same_top_k_on_both_paths(name, make_cfg, tmp_path):
    base, size = make_base(name)
    write_packed_base(base, tmp_path / "base.bnnpack")
    preprocess = {"image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3}
    files = []
    for strategy in ("udta", "head_only"):
        files.append(tmp_path / f"{strategy}.safetensors")
        export_adapter(
            adapted(strategy, base), files[-1], reference_base=base, class_names=list("abcd"), preprocess=preprocess
        )
    write_images(tmp_path / "images", n=6)
    predictions = {}
    for packed in ("true", "false"):
        out = tmp_path / f"preds_{packed}.json"
        cfg = make_cfg(
            "task=predict",
            f"base.file={tmp_path / 'base.bnnpack'}",
            f"adapters=[{','.join(map(str, files))}]",
            f"inputs={tmp_path / 'images'}",
            "predict.top_k=3",
            f"predict.output={out}",
            f"predict.packed={packed}",
            name=f"predict_{packed}",
        )
        task.run(cfg)
        predictions[packed] = json.loads(out.read_text())["predictions"]
    for adapter, rows in predictions["true"].items():
        for image, row in rows.items():
            other = predictions["false"][adapter][image]
            assert [r["class"] for r in row] == [r["class"] for r in other]
            assert [r["prob"] for r in row] == pytest.approx([r["prob"] for r in other], abs=1e-5)


# ------------------------------------------------------------------ issue 23, item 7: what the kernels do not implement

# binary convs the kernels do not compute as the float layer does: each stays on the float path
UNSUPPORTED = {
    "bias": (dict(bias=True), "a bias"),
    "dilation": (dict(dilation=2, padding=2), "dilation (2, 2)"),
    "circular padding": (dict(padding_mode="circular"), "padding_mode='circular'"),
    "reflect padding": (dict(padding_mode="reflect"), "padding_mode='reflect'"),
    "unequal strides": (dict(stride=(1, 2)), "stride (1, 2)"),
    "unequal padding": (dict(padding=(0, 1)), "padding (0, 1)"),
    "groups": (dict(groups=2), "groups=2"),
}


@needs_kernels
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_a_binary_conv_the_kernels_do_not_implement_stays_float_with_one_warning_line(case, caplog):
    """Before issue 23 these ran on the kernels with wrong values (max |diff| 4-20) or the wrong shape."""
    options, reason = UNSUPPORTED[case]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        BinaryConv2d(8, 32, 3, padding=1, bias=False),  # the kernels run this one
        torch.nn.Hardtanh(),
        BinaryConv2d(32, 16, 3, **{"padding": 1, "bias": False, **options}),
    ).eval()
    with torch.no_grad():
        if net[2].bias is not None:
            net[2].bias.normal_()
        x = torch.randn(2, 8, 9, 9)
        expected = net(x)
        with caplog.at_level(logging.WARNING):
            packed = use_packed_kernels(copy.deepcopy(net))
        got = packed(x)
    assert isinstance(packed[0], PackedBinaryConv2d) and type(packed[2]) is BinaryConv2d
    # integer sums are exact; a bias is added in another order on the kernel's channels-last output
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max())
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line == f"packed 1-bit kernels: 2 stays on the float path (the kernels do not implement {reason})"


@pytest.mark.parametrize("level", LEVELS)
def test_nan_packs_as_plus_one_as_the_float_sign_gives_it(level):
    """sign(NaN) is +1 in training (torch.sign(NaN) = 0, and sign(0) = +1); the kernels packed -1 before issue 23."""
    x = torch.randn(2, 70, 5, 19, generator=torch.Generator().manual_seed(9))
    x[0, :, 0, 0] = float("nan")
    x[1, 3::7, 2, :] = float("nan")
    bias = torch.randn(70, generator=torch.Generator().manual_seed(10))
    assert (sign(x) == 1).all(dim=1)[0, 0, 0]
    for name, t in {
        "nchw": x,
        "nhwc": x.contiguous(memory_format=torch.channels_last),
        "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
    }.items():
        with at_level(level):
            assert torch.equal(kernels.pack_signs(t, 1).to_signs(), sign(x)), name
            assert torch.equal(kernels.pack_signs(t, 1, bias).to_signs(), sign(x + bias.view(1, -1, 1, 1))), name


@needs_kernels
@pytest.mark.parametrize("name", ["ste", "reactnet"])
def test_nan_inputs_give_the_float_paths_outputs(name):
    base, size = make_base(name)
    reference, packed = float_and_packed(base)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(11))
    x[0, :, size // 2, size // 2] = float("nan")
    with torch.no_grad():
        for ours, theirs in zip(packed.stage_outputs(x), reference.stage_outputs(x), strict=True):
            assert torch.equal(ours.isnan(), theirs.isnan())
            finite = ~theirs.isnan()
            assert torch.allclose(
                ours[finite], theirs[finite], rtol=1e-5, atol=1e-5 * theirs[finite].abs().max().item()
            )
