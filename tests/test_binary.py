"""Binary layers: sign, the straight-through gradient, binary
conv/linear forward passes, latent-weight clamping, no in-place binarisation."""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear, BinaryModule, clamp_latent_weights
from bnn_adapt.nn.quantizers import SignSTE, binarize, sign
from bnn_adapt.training.module import Classifier


def reference_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 for x >= 0, -1 otherwise, written independently of the module."""
    out = torch.empty_like(x)
    for i, v in enumerate(x.flatten().tolist()):
        out.view(-1)[i] = 1.0 if v >= 0 else -1.0
    return out


# ---------------------------------------------------------------------------
# sign and its straight-through gradient


def test_sign_values_including_zero():
    x = torch.tensor([-2.0, -1.0, -1e-7, 0.0, -0.0, 1e-7, 0.5, 3.0])
    expected = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.equal(sign(x), expected)
    assert torch.equal(binarize(x), expected)
    assert torch.equal(SignSTE.apply(x), expected)


def test_sign_is_not_in_place_and_keeps_dtype_and_shape():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    before = x.clone()
    y = sign(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(x, before)
    assert torch.equal(y, reference_sign(x))


def test_sign_ste_gradient_is_box_of_width_one():
    points = [-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 2.0]
    x = torch.tensor(points, requires_grad=True)
    upstream = torch.tensor([3.0, -2.0, 0.5, 7.0, -4.0, 1.5, 9.0])
    SignSTE.apply(x).backward(upstream)
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # 1{|x| <= 1}
    assert torch.equal(x.grad, upstream * mask)


def test_sign_ste_gradient_matches_hardtanh_derivative_inside_and_outside():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    binarize(x).sum().backward()
    expected = (x.detach().abs() <= 1).float()
    assert torch.equal(x.grad, expected)
    assert x.grad.sum() == 21  # -1.0, -0.9, ..., 1.0


# ---------------------------------------------------------------------------
# binary conv / linear forward


def test_binary_conv_forward_is_conv_of_signs():
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(reference_sign(x), reference_sign(conv.weight.detach()), stride=2, padding=1)
    out = conv(x)
    assert out.shape == (2, 6, 5, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # outputs of a ±1 conv are integers of the parity of the fan-in (4*3*3 = 36
    # for inner pixels): check the result is not a real-valued conv
    assert torch.equal(out, out.round())


def test_binary_conv_without_input_binarisation_uses_the_real_input():
    torch.manual_seed(1)
    conv = BinaryConv2d(3, 5, 3, padding=1, bias=False, binarize_input=False)
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, reference_sign(conv.weight.detach()), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-6, atol=1e-5)
    binarised = F.conv2d(reference_sign(x), reference_sign(conv.weight.detach()), padding=1)
    assert not torch.allclose(conv(x), binarised)


def test_binary_conv_keeps_its_latent_weight_real():
    conv = BinaryConv2d(2, 3, 3, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(-0.5, 0.5)
    before = conv.weight.detach().clone()
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert torch.equal(conv.weight.detach(), before)
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_binary_linear_forward_is_linear_of_signs_plus_real_bias():
    torch.manual_seed(2)
    lin = BinaryLinear(7, 4)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([0.25, -0.5, 0.125, 0.75]))
    x = torch.randn(5, 7)
    expected = reference_sign(x) @ reference_sign(lin.weight.detach()).T + lin.bias.detach()
    torch.testing.assert_close(lin(x), expected, rtol=0, atol=1e-6)
    assert lin.binary_param_names == ("weight", "bias")


def test_binary_layers_pass_ste_gradient_to_input():
    lin = BinaryLinear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.2, -0.7, 0.1]]))
    x = torch.tensor([[0.5, 2.0, -1.0]], requires_grad=True)
    lin(x).sum().backward()
    # d/dx = sign(W) * 1{|x| <= 1}
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 1.0]]))


# ---------------------------------------------------------------------------
# latent weight clamp


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.bconv = BinaryConv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fconv = nn.Conv2d(4, 4, 1)
        self.blin = BinaryLinear(4, 3)
        self.flin = nn.Linear(3, 2)

    def forward(self, x):
        x = F.hardtanh(self.bn(self.bconv(x)))
        x = self.fconv(x).mean(dim=(2, 3))
        return self.flin(self.blin(x))


def binary_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for mod_name, m in model.named_modules():
        if isinstance(m, BinaryModule):
            for n in m.binary_param_names:
                p = getattr(m, n, None)
                if p is not None:
                    out.append((f"{mod_name}.{n}", p))
    return out


def test_clamp_after_big_adam_step_keeps_binary_params_in_range_only():
    torch.manual_seed(3)
    model = Mixed()
    opt = torch.optim.Adam(model.parameters(), lr=10.0)
    F.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    binary_ids = {id(p) for _, p in binary_params(model)}
    assert len(binary_ids) == 3  # bconv.weight, blin.weight, blin.bias
    # the step pushed binary weights out of range, so the clamp has work to do
    assert max(p.detach().abs().max().item() for _, p in binary_params(model)) > 1
    others_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in binary_ids}
    assert max(t.abs().max().item() for t in others_before.values()) > 1  # fp32 params left alone

    clamp_latent_weights(model)

    for name, p in binary_params(model):
        assert p.detach().abs().max() <= 1, name
        assert (p.detach().abs() == 1).any(), name  # was clamped, not reset
    for name, p in model.named_parameters():
        if id(p) not in binary_ids:
            assert torch.equal(p.detach(), others_before[name]), name


def test_clamp_is_identity_inside_range_and_skips_frozen_and_unclamped_layers():
    model = Mixed()
    with torch.no_grad():
        model.bconv.weight.uniform_(-0.9, 0.9)
        model.blin.weight.fill_(5.0)
    model.blin.weight.requires_grad_(False)  # frozen: never touched
    before = model.bconv.weight.detach().clone()
    clamp_latent_weights(model)
    assert torch.equal(model.bconv.weight.detach(), before)
    assert torch.equal(model.blin.weight.detach(), torch.full_like(model.blin.weight, 5.0))

    model.blin.weight.requires_grad_(True)
    model.blin.clamp_latent = False  # e.g. ReActNet's unclamped binary convs
    clamp_latent_weights(model)
    assert torch.equal(model.blin.weight.detach(), torch.full_like(model.blin.weight, 5.0))


def test_lightning_optimizer_step_clamps_latent_weights():
    torch.manual_seed(4)
    model = Mixed()
    module = Classifier(model, num_classes=2, optimizer=lambda params: torch.optim.Adam(params, lr=10.0))
    data = TensorDataset(torch.randn(8, 3, 6, 6), torch.tensor([0, 1] * 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 1
    # a real step happened: with lr 10 the fp32 params moved far outside [-1, 1]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "flin.weight" in moved and "bconv.weight" in moved
    assert model.flin.weight.detach().abs().max() > 1
    for name, p in binary_params(model):
        assert p.detach().abs().max() <= 1, name


# ---------------------------------------------------------------------------
# no in-place binarisation in the STE net


def test_stage_outputs_stay_real_valued_and_unchanged():
    torch.manual_seed(5)
    net = STEResNetCIFAR(num_classes=4, width=0.1)
    net.train()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    x_before = x.detach().clone()
    taps = net.stage_outputs(x)
    assert len(taps) == 3
    clones = [t.detach().clone() for t in taps]
    for t in clones:
        # hardtanh output + shortcut (thesis block): real values, not only ±1, and not clipped
        assert ((t.abs() < 1) & (t != 0)).any()
        assert t.abs().max() > 1
    logits = net.classifier(net.pre_classifier(taps[-1]))
    (logits.sum() + sum(t.sum() for t in taps[:-1])).backward()
    for t, c in zip(taps, clones, strict=True):
        assert torch.equal(t.detach(), c)
    assert torch.equal(x.detach(), x_before)
    # and the full forward from the same input agrees (eval: no BN stat drift)
    net.eval()
    a = net.stage_outputs(x_before)
    b = net.stage_outputs(x_before)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_frozen_binary_weights_are_reused_and_follow_every_change():
    """The cached sign(W) of a frozen layer never goes stale (binary.frozen_binary_weight)."""
    from bnn_adapt.bases.reactnet import ScaledBinaryConv2d
    from bnn_adapt.nn.layers import scaled_sign

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for conv, binarise in (
        (BinaryConv2d(4, 3, 3, padding=1, bias=False), sign),
        (ScaledBinaryConv2d(4, 3), scaled_sign),
    ):
        conv.weight.requires_grad_(False)

        def expected(conv=conv, binarise=binarise):
            inputs = sign(x) if getattr(conv, "binarize_input", False) else x
            return F.conv2d(inputs, binarise(conv.weight), stride=conv.stride, padding=conv.padding)

        first = conv(x)
        assert torch.equal(first, expected())
        cached = conv.__dict__["_frozen_binary_weight"][2]
        conv(x)
        assert conv.__dict__["_frozen_binary_weight"][2] is cached  # reused
        with torch.no_grad():
            conv.weight.mul_(-1)  # in place, as an optimiser step
        assert torch.equal(conv(x), expected()) and not torch.equal(conv(x), first)
        conv.load_state_dict({"weight": torch.randn_like(conv.weight)})
        assert torch.equal(conv(x), expected())
        twin = copy.deepcopy(conv)
        with torch.no_grad():
            twin.weight.copy_(-conv.weight)
        assert torch.equal(twin(x), expected(twin)) and torch.equal(conv(x), expected())
        # a weight that trains is binarised through the STE every time, never cached
        conv.weight.requires_grad_(True)
        out = conv(x)
        out.sum().backward()
        assert conv.weight.grad is not None and torch.equal(out, expected())
