"""``base.binarize=thesis_code`` computes what the thesis's own code computes, forward and backward, and
that code's ``ResNet_cifar10`` checkpoints load as a base here (docs/thesis.md).

The references below are written from the thesis code's description (BinaryNet.pytorch's layers): a
binary layer replaces ``input.data`` and ``weight.data`` by ``tensor.sign()``, so sign(0) = 0, the
gradient passes through unchanged, and a tensor the shortcut also holds is binarised in place.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.adapters import HeadOnly, Parallel
from bnn_adapt.bases import STEResNetCIFAR
from bnn_adapt.bases.ste_resnet import BasicBlock
from bnn_adapt.deploy.packed_base import pack_base
from bnn_adapt.errors import CheckpointError, ConfigError, ExportError
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear, latent_weights
from bnn_adapt.run import builders
from bnn_adapt.run.task import run
from bnn_adapt.training.lean import make_lean
from tests.helpers.config import compose_config


def thesis_conv(x: torch.Tensor, weight: nn.Parameter, stride: int, padding: int) -> torch.Tensor:
    """BinarizeConv2d.forward as the thesis code writes it (weight.org is ``weight.org`` here)."""
    if x.size(1) != 3:
        x.data = x.data.sign()
    if not hasattr(weight, "org"):
        weight.org = weight.data.clone()
    weight.data = weight.org.sign()
    return F.conv2d(x, weight, None, stride, padding)


def thesis_bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)


def thesis_block(x: torch.Tensor, ref: BasicBlock) -> torch.Tensor:
    """The thesis code's BasicBlock.forward (``residual = x``, in-place hardtanh, ``out += residual``)."""
    residual = x
    stride = ref.conv1.stride[0]
    out = F.hardtanh(thesis_bn(thesis_conv(x, ref.conv1.weight, stride, 1), ref.bn1), inplace=True)
    out = F.hardtanh(thesis_bn(thesis_conv(out, ref.conv2.weight, 1, 1), ref.bn2), inplace=True)
    if ref.shortcut is not None:
        residual = thesis_bn(thesis_conv(residual, ref.shortcut[0].weight, stride, 0), ref.shortcut[1])
    out += residual
    return out


def input_with_zeros(shape) -> torch.Tensor:
    """A block input as the thesis network has them: hardtanh outputs, some saturated, some exactly 0."""
    x = torch.randn(shape).clamp(-1, 1)
    x[:, :, ::3, ::2] = 0.0
    return x


@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(6, 6, 1), (6, 8, 2)])
def test_a_block_matches_the_thesis_code_forward_and_backward(c_in, c_out, stride):
    torch.manual_seed(0)
    ours = BasicBlock(c_in, c_out, stride, block="thesis", binarize="thesis_code").train()
    ref = BasicBlock(c_in, c_out, stride).train()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():  # a zero latent weight binarises to 0
        ours.conv1.weight[0, 0] = 0.0
        ref.conv1.weight[0, 0] = 0.0
    x = input_with_zeros((3, c_in, 8, 8))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = ours(x_ours)
    out_ref = thesis_block(x_ref * 1.0, ref)  # * 1.0: the reference binarises its input tensor in place
    assert torch.equal(out_ours, out_ref)
    if ours.shortcut is None:  # where the branch is 0 and x was 0 the sum is exactly 0: sign(0) = 0
        assert (out_ours == 0).any()
    g = torch.randn_like(out_ours)
    out_ours.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, msg=name)
    # the identity gradient: the input gradient is not masked where |x| > 1
    big = torch.full((1, c_in, 4, 4), 3.0, requires_grad=True)
    ours(big).sum().backward()
    assert big.grad.abs().sum() > 0


def test_the_network_binarises_as_the_thesis_code():
    torch.manual_seed(0)
    net = STEResNetCIFAR(num_classes=3, width=0.2, binarize="thesis_code")
    stem, head = net.stem[0], net.classifier[0]
    assert not stem.binarize_input and stem.binarizer.name == "thesis_code"  # the first conv: weights only
    assert head.binarize_input and not net.new_head(784, 3)[0].binarize_input  # BinarizeLinear's 784 rule
    # init_model: N(0, sqrt(2 / (k*k*c_out))) for the binary convs, BatchNorm2d weight 1 and bias 0
    conv = net.stages[2][0].conv2
    expected = math.sqrt(2.0 / (9 * conv.out_channels))
    assert abs(conv.weight.std().item() / expected - 1) < 0.1
    norms = [m for m in net.modules() if type(m) is nn.BatchNorm2d]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    # every latent binary weight (and the binary head's bias) is clamped to [-1, 1] after each step
    binary = {id(m.weight) for m in net.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))} | {id(head.bias)}
    assert {id(p) for p in latent_weights(net)} == binary
    assert net.arch_config()["binarize"] == "thesis_code"
    with pytest.raises(ConfigError, match="base.binarize='sign'.*ste, thesis_code"):
        STEResNetCIFAR(binarize="sign")


def test_lean_and_packing_refuse_ternary_activations_in_one_line():
    net = STEResNetCIFAR(num_classes=3, width=0.1, binarize="thesis_code")
    with pytest.raises(ConfigError, match="memory=lean.*thesis_code.*memory=standard") as err:
        make_lean(net)
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="packed base.*zero mask") as err:
        pack_base(net)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("head", ["concat", "head_only"])
def test_the_tap_cache_is_exact(head):
    torch.manual_seed(0)
    base = STEResNetCIFAR(5, width=0.1, binarize="thesis_code")
    model = (HeadOnly(base, 5) if head == "head_only" else Parallel(base, 5, head=head)).train()
    x, y = input_with_zeros((4, 3, 16, 16)), torch.randint(0, 5, (4,))
    assert model.can_cache_features()
    with torch.no_grad():
        features = tuple(f.clone() for f in model.frozen_features(x))
    results = []
    for inputs in (x, features):  # the images, then the cached taps: the same outputs and gradients
        model.zero_grad(set_to_none=True)
        out = model(inputs)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_images, grads_images), (out_cached, grads_cached) = results
    assert torch.equal(out_images, out_cached) and grads_images.keys() == grads_cached.keys()
    assert all(torch.equal(grads_images[n], grads_cached[n]) for n in grads_images)


# --------------------------------------------------------------------------- the thesis code's checkpoints


def thesis_state_dict(inflate: int, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``ResNet_cifar10(depth=18, inflate)`` state dict by the thesis code's names and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = torch.rand(c, generator=gen) + 0.5
        state[f"{name}.bias"] = torch.randn(c, generator=gen) * 0.1
        state[f"{name}.running_mean"] = torch.randn(c, generator=gen) * 0.1
        state[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) * 0.1

    channels = [16 * inflate, 32 * inflate, 64 * inflate]
    conv("conv1", channels[0], 3, 3)
    bn("bn1", channels[0])
    c_prev = channels[0]
    for i, c in enumerate(channels, start=1):
        for j in range(2):
            conv(f"layer{i}.{j}.conv1", c, c_prev if j == 0 else c, 3)
            bn(f"layer{i}.{j}.bn1", c)
            conv(f"layer{i}.{j}.conv2", c, c, 3)
            bn(f"layer{i}.{j}.bn2", c)
        if c != c_prev:
            conv(f"layer{i}.0.downsample.0", c, c_prev, 1)
            bn(f"layer{i}.0.downsample.1", c)
        c_prev = c
    bn("bn2", channels[-1])
    state["fc.weight"] = torch.randn(num_classes, channels[-1], generator=gen) * 0.1
    state["fc.bias"] = torch.randn(num_classes, generator=gen) * 0.1
    bn("bn3", num_classes)
    return state


def thesis_network(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ResNet_cifar10.forward`` in eval mode over ``state`` (the thesis code's names), as its code computes."""

    def bn(x, name):
        w, b, m, v = (state[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)

    def conv(x, name, stride, padding):
        if x.size(1) != 3:
            x.data = x.data.sign()
        return F.conv2d(x, state[f"{name}.weight"].sign(), None, stride, padding)

    x = F.hardtanh(bn(conv(x, "conv1", 1, 1), "bn1"))
    for i in (1, 2, 3):
        for j in (0, 1):
            name, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            residual = x
            out = F.hardtanh(bn(conv(x, f"{name}.conv1", stride, 1), f"{name}.bn1"))
            out = F.hardtanh(bn(conv(out, f"{name}.conv2", 1, 1), f"{name}.bn2"))
            if f"{name}.downsample.0.weight" in state:
                residual = bn(conv(residual, f"{name}.downsample.0", stride, 0), f"{name}.downsample.1")
            x = out + residual
    x = F.hardtanh(bn(F.avg_pool2d(x, x.shape[-1]).flatten(1), "bn2"))
    x = F.linear(x.sign(), state["fc.weight"].sign(), state["fc.bias"])
    return F.log_softmax(bn(x, "bn3"), dim=-1)


def written(path, state: dict, fmt: str):
    """``state`` as ``Trainer.save`` (``save``) or ``Trainer.save_Best`` (``best``) writes it."""
    if fmt == "save":
        payload = {
            "epoch": 4,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "lr_scheduler_state_dict": None,
            "loss": 0.75,
        }
    else:
        payload = state
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("fmt", ["save", "best"])
def test_a_thesis_code_checkpoint_is_a_base_that_predicts_as_the_thesis_code(make_cfg, tmp_path, fmt):
    state = thesis_state_dict(inflate=1, num_classes=5)
    path = written(tmp_path / f"thesis_{fmt}.pth", state, fmt)
    cfg = make_cfg("data=cifar5_5", f"base.checkpoint={path}", "base.width=0.2", "base.binarize=thesis_code")
    base = builders.load_trained_base(cfg).eval()
    assert base.arch_config() == {
        "num_classes": 5,
        "width": 0.2,
        "blocks_per_stage": 2,
        "block": "thesis",
        "binarize": "thesis_code",
    }
    x = input_with_zeros((8, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(F.log_softmax(base(x), dim=-1), thesis_network(x.clone(), state))
    # and adapts as a base of ours, the run saying where it came from
    record = run(make_cfg(*cfg_overrides(path), "adapter=head_only", "trainer.max_epochs=1", name=f"adapt_{fmt}"))
    assert record["base_origin"].startswith("thesis code (Trainer.save")


def cfg_overrides(path) -> tuple[str, ...]:
    return ("data=cifar5_5", f"base.checkpoint={path}", "base.width=0.2", "base.binarize=thesis_code")


def test_a_thesis_code_checkpoint_needs_the_matching_settings(make_cfg, tmp_path):
    path = written(tmp_path / "thesis.pth", thesis_state_dict(inflate=1, num_classes=5), "best")
    with pytest.raises(CheckpointError, match=r"set base.width=0.2 and base.binarize=thesis_code") as err:
        builders.load_trained_base(make_cfg("data=cifar5_5", f"base.checkpoint={path}"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"layer4.0.conv1.weight": torch.zeros(1, 1, 3, 3)}), "layer4.*ResNet_cifar10"),
        (lambda s: s.update({"fc.weight": torch.zeros(5, 32)}), r"shapes of another network.*fc.weight"),
        (lambda s: s.pop("layer2.1.bn2.running_var"), r"Missing keys: layer2.1.bn2.running_var"),
        (lambda s: s.update({"conv1.weight": torch.zeros(12, 3, 3, 3)}), "12 channels, not 16 x inflate"),
    ],
)
def test_another_architecture_or_a_mismatching_file_is_refused_in_one_line(make_cfg, tmp_path, edit, message):
    state = thesis_state_dict(inflate=1, num_classes=5)
    edit(state)
    path = written(tmp_path / "thesis.pth", state, "save")
    with pytest.raises(CheckpointError, match=message) as err:
        builders.load_trained_base(make_cfg(*cfg_overrides(path)))
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- pretraining and every strategy


@pytest.fixture(scope="module")
def thesis_code_base(tmp_path_factory, data_dir) -> Path:
    """``base.binarize=thesis_code`` pretrained for one epoch; returns its ``paths.base_dir``."""
    base_dir = tmp_path_factory.mktemp("thesis_code_bases")
    out = tmp_path_factory.mktemp("thesis_code_pretrain") / "run"
    overrides = ["data=cifar5_5", "task=pretrain", "base.binarize=thesis_code", "trainer.max_epochs=1"]
    record = run(compose_config([*overrides, "adapter=full_finetune"], out, data_dir, base_dir))
    assert record["status"] == "complete"
    return base_dir


@pytest.mark.parametrize("adapter", ["head_only", "full_finetune", "serial", "udta", "lora", "bitfit"])
def test_every_strategy_adapts_a_thesis_code_base(make_cfg, thesis_code_base, adapter):
    cfg = make_cfg(
        "data=cifar5_5",
        f"adapter={adapter}",
        "base.binarize=thesis_code",
        "trainer.max_epochs=1",
        base_dir=thesis_code_base,
    )
    record = run(cfg)
    assert record["status"] == "complete" and record["base_origin"] == "bnn_adapt"
    assert record["size_pct"] is not None and record["macs_binary"] > 0


def test_a_file_in_no_format_the_base_reads_is_refused_naming_its_keys(make_cfg, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2), "note": "not a network"}, path)
    with pytest.raises(CheckpointError, match=r"records no architecture.*its keys: note, weights") as err:
        builders.load_trained_base(make_cfg("data=cifar5_5", f"base.checkpoint={path}"))
    assert "\n" not in str(err.value)
