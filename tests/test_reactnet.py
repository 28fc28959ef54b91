"""ReActNet-18 base: layer sizes, forward, approx-sign gradient, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnn_adapt.bases.reactnet import ChannelsLastMaxPool2d, ReActNet18, ScaledBinaryConv2d
from bnn_adapt.bases.reactnet_checkpoint import load_reactnet_checkpoint, save_reactnet_checkpoint
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.errors import CheckpointError
from bnn_adapt.nn.layers import BinaryModule, approx_sign

TINY = 0.125  # 8/16/32/64 channels


def binary_fp32_counts(model: nn.Module) -> tuple[int, int]:
    binary_ids = set()
    for module in model.modules():
        if isinstance(module, BinaryModule):
            for name in module.binary_param_names:
                p = getattr(module, name, None)
                if p is not None:
                    binary_ids.add(id(p))
    params = list(model.parameters())
    binary = sum(p.numel() for p in params if id(p) in binary_ids)
    return binary, sum(p.numel() for p in params) - binary


@pytest.fixture(scope="module")
def full() -> ReActNet18:
    return ReActNet18()


def test_interface_attributes(full):
    assert full.arch == "reactnet18" and full.input_size == 224
    assert full.stage_channels == [64, 128, 256, 512]
    assert len(full.stages) == 4 and all(isinstance(s, nn.Sequential) and len(s) == 4 for s in full.stages)
    assert isinstance(full.classifier, nn.Linear)
    assert full.arch_config() == {"num_classes": 1000, "width": 1.0}
    head = full.new_head(1024, 7)
    assert isinstance(head, nn.Linear) and head.in_features == 1024 and head.out_features == 7
    conv = full.stages[0][0].binary_conv
    assert isinstance(conv, BinaryModule) and conv.binary_param_names == ("weight",) and not conv.clamp_latent


def test_per_layer_parameter_counts(full):
    assert full.stem.conv1.weight.numel() == 3 * 64 * 7 * 7
    assert sum(p.numel() for p in full.stem.bn1.parameters()) == 2 * 64
    binary_sizes = {  # (first block, other blocks)
        64: (36_864, 36_864),
        128: (73_728, 147_456),
        256: (294_912, 589_824),
        512: (1_179_648, 2_359_296),
    }
    c_prev = 64
    for stage, c in zip(full.stages, full.stage_channels, strict=True):
        first, other = binary_sizes[c]
        for j, block in enumerate(stage):
            c_in = c_prev if j == 0 else c
            assert block.binary_conv.weight.numel() == (first if j == 0 else other)
            assert block.move0.bias.numel() == c_in
            assert block.move1.bias.numel() == block.move2.bias.numel() == c
            assert block.prelu.weight.numel() == c
            assert sum(p.numel() for p in block.bn1.parameters()) == 2 * c
            if j == 0 and c != 64:
                assert block.downsample[1].weight.numel() == c_prev * c
                assert sum(p.numel() for p in block.downsample[2].parameters()) == 2 * c
            else:
                assert block.downsample is None
        c_prev = c
    assert sum(p.numel() for p in full.classifier.parameters()) == 513_000


def test_binary_and_fp32_totals(full):
    binary, fp32 = binary_fp32_counts(full)
    assert binary == 10_985_472
    # stem 9,408 + 128; fc 513,000; downsample 8,192+256, 32,768+512, 131,072+1,024;
    # per block: move0 c_in, BN 2c, move1/PReLU/move2 3c
    assert fp32 == 9_408 + 128 + 513_000 + 173_824 + 22_592
    assert fp32 == 718_952


def test_forward_shapes_and_real_valued_stages():
    model = ReActNet18(num_classes=10, width=TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model.stage_outputs(x)
        logits = model(x)
    assert logits.shape == (2, 10)
    assert [o.shape[1] for o in outs] == model.stage_channels == [8, 16, 32, 64]
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    for o in outs:
        assert o.unique().numel() > 2
    assert model.pre_classifier(outs[-1]).shape == (2, 64)
    with torch.no_grad():
        sides = [o.shape[-1] for o in model.stage_outputs(torch.randn(1, 3, 224, 224))]
    assert sides == [56, 28, 14, 7]


def test_backward_reaches_latent_weights_and_biases():
    model = ReActNet18(num_classes=5, width=TINY)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    block = model.stages[1][0]
    assert block.binary_conv.weight.grad is not None and block.binary_conv.weight.grad.abs().sum() > 0
    assert block.move0.bias.grad is not None and block.move0.bias.grad.abs().sum() > 0


def reactnet_block_by_the_paper(block, x: torch.Tensor) -> torch.Tensor:
    """One ReActNet block (Liu et al. 2020, Bi-Real structure), from the paper's equations with plain
    tensor ops, in eval mode:

    RSign:  x_b = +1 if x >= -b0 else -1 (a learnable threshold per channel; sign(0) = +1)
    conv:   z = conv3x3(x_b, mean|W| * sign(W) per output channel), stride s, padding 1, no bias
    BN:     (z - mu) / sqrt(var + eps) * gamma + beta
    add:    y = BN(z) + shortcut(x); shortcut = x, or BN(conv1x1(avgpool2x2(x))) when s = 2 or channels change
    RPReLU: y' = y + b1; out = (y' if y' > 0 else slope * y') + b2
    """

    def bn(v, m):
        shape = (1, -1, 1, 1)
        scale = m.weight.view(shape) / torch.sqrt(m.running_var.view(shape) + m.eps)
        return (v - m.running_mean.view(shape)) * scale + m.bias.view(shape)

    w = block.binary_conv.weight
    w_b = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    x_b = torch.where(x + block.move0.bias >= 0, 1.0, -1.0)
    stride = block.binary_conv.stride
    z = torch.nn.functional.conv2d(x_b, w_b, stride=stride, padding=1)
    if block.downsample is None:
        shortcut = x
    else:
        pooled = torch.nn.functional.avg_pool2d(x, 2, stride)
        shortcut = bn(torch.nn.functional.conv2d(pooled, block.downsample[1].weight), block.downsample[2])
    y = bn(z, block.bn1) + shortcut + block.move1.bias
    slope = block.prelu.weight.view(1, -1, 1, 1)
    return torch.where(y > 0, y, slope * y) + block.move2.bias


@pytest.mark.parametrize("c_in, c_out, stride", [(8, 8, 1), (8, 16, 2)])
def test_block_matches_the_papers_equations(c_in, c_out, stride):
    from bnn_adapt.bases.reactnet import ReActBlock

    block = ReActBlock(c_in, c_out, stride).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter and statistic away from its initial value
        for name, p in [*block.named_parameters(), *block.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "prelu.weight")):
                p.copy_(torch.rand(p.shape, generator=generator) * 0.5 + 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    assert (block.downsample is not None) == (stride != 1 or c_in != c_out)
    x = torch.randn(4, c_in, 12, 12, generator=generator)
    with torch.no_grad():
        out, expected = block(x), reactnet_block_by_the_paper(block, x)
    assert out.shape == expected.shape == (4, c_out, 12 // stride, 12 // stride)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), float((out - expected).abs().max())
    assert (out - expected).abs().max() < 1e-3 * expected.abs().max()


def test_approx_sign_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0], requires_grad=True)
    y = approx_sign(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.0, 0.0, 1.0, 2.0, 1.5, 1.0, 0.0, 0.0])


def test_binary_conv_weights_are_scaled_signs():
    conv = ScaledBinaryConv2d(2, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight) * 2)
    x = torch.randn(1, 2, 5, 5)
    w = conv.weight.detach()
    expected = nn.functional.conv2d(x, torch.sign(w) * w.abs().mean(dim=(1, 2, 3), keepdim=True), padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    conv(x).sum().backward()
    assert torch.equal(conv.weight.grad == 0, w.abs() > 1)  # straight-through, cut beyond |W| > 1


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ReActNet18(num_classes=10, width=TINY)
    with torch.no_grad():  # non-trivial BN statistics and biases
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    model.eval()
    path = tmp_path / "model_best.pth.tar"
    save_reactnet_checkpoint(model, path, epoch=3, best_top1_acc=12.5)

    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert {"state_dict", "epoch", "best_top1_acc", "optimizer"} <= raw.keys()
    keys = list(raw["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    for k in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.move0.bias",
        "layer1.0.binary_conv.weight",
        "layer1.0.prelu.weight",
        "layer2.0.downsample.1.weight",
        "layer4.3.move2.bias",
        "fc.bias",
    ):
        assert "module." + k in keys

    loaded = load_reactnet_checkpoint(path, num_classes=10, width=TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_reactnet_checkpoint(tmp_path / "nope.pth.tar")
    msg = str(info.value)
    assert "missing" in msg and "base.checkpoint" in msg and "liuzechun/ReActNet" in msg


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "junk.pth.tar"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_reactnet_checkpoint(path)


def test_other_architecture_is_refused(tmp_path):
    ste = STEResNetCIFAR(width=0.1)
    path = tmp_path / "ste.pth.tar"
    state = {"module." + k: v for k, v in ste.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0, "best_top1_acc": 0.0, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="Missing keys: .*Unexpected keys"):
        load_reactnet_checkpoint(path, num_classes=10, width=TINY)


def test_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    save_reactnet_checkpoint(ReActNet18(num_classes=10, width=TINY), path)
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_reactnet_checkpoint(path, num_classes=7, width=TINY)


def test_channels_last_max_pool_gives_the_standard_result_with_and_without_autograd():
    pool, reference = ChannelsLastMaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 5, 17, 17, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = pool(x)
    assert torch.equal(fast, reference(x)) and fast.is_contiguous()
    x.requires_grad_(True)
    out = pool(x)
    out.sum().backward()
    expected = x.grad.clone()
    x.grad = None
    reference(x).sum().backward()
    assert torch.equal(out, reference(x)) and torch.equal(x.grad, expected)
