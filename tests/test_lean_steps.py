"""memory=lean trains bit for bit like standard autograd, at the batch sizes and
head sizes runs use: several Adam steps with latent-weight clamping, then the
whole ``state_dict`` (weights, BN statistics) compared with ``torch.equal``.

Both bases at full width (the real classifier sizes: STE 320 -> C, concat
640 -> C; ReActNet 512 -> C), on small images so that a step stays cheap:
8x8 for the STE net (stage maps 8/4/2), 32x32 for ReActNet (8/4/2/1).
Summation order inside a matrix product depends on its shapes, so batch 6
alone proves little: a weight gradient computed as ``x.t() @ grad`` instead
of autograd's ``grad.t() @ x`` is identical at batch 6 and differs at 64.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.bases import ReActNet18, STEResNetCIFAR
from bnn_adapt.nn.layers import BinaryLinear, clamp_latent_weights
from bnn_adapt.training.lean import make_lean, set_memory_mode
from tests.helpers.models import realistic_bn

# base, its image size, its own classes (what pretraining trains), the target classes: CIFAR-10 5-5 (and the
# digits, Fashion-MNIST, the bench) and ImageNet -> Flowers-102. (A 320 -> 20 or 80 product happens to sum in
# the same order either way on x86 at batch 64; 320 -> 5 does not.)
BASES = {
    "ste": (lambda: STEResNetCIFAR(num_classes=5, width=1.0), 8, 5, 5),
    "reactnet": (lambda: ReActNet18(num_classes=1000, width=1.0), 32, 1000, 102),
}
STEPS = 3
CASES = [(b, s) for b in BASES for s in [*STRATEGIES, "pretrain"]]


@functools.cache
def base_state(base_kind: str) -> dict[str, torch.Tensor]:
    make, *_ = BASES[base_kind]
    torch.manual_seed(0)
    return copy.deepcopy(realistic_bn(make()).state_dict())


def build(base_kind: str, strategy: str, freeze_bn: bool = True) -> tuple[nn.Module, int, int]:
    make, size, base_classes, target_classes = BASES[base_kind]
    torch.manual_seed(0)
    base = make()
    base.load_state_dict(base_state(base_kind))
    if strategy == "pretrain":
        return base.train(), size, base_classes
    torch.manual_seed(1)
    return STRATEGIES[strategy](base, target_classes, freeze_bn=freeze_bn).train(), size, target_classes


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> list[float]:
    """``steps`` training steps as the Lightning module takes them: Adam, then clamping."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        clamp_latent_weights(model)
        losses.append(loss.item())
    return losses


def differing(a: nn.Module, b: nn.Module) -> list[str]:
    state_b = b.state_dict()
    assert list(a.state_dict()) == list(state_b)
    return [name for name, value in a.state_dict().items() if not torch.equal(value, state_b[name])]


@pytest.mark.parametrize("batch", [6, 64])
@pytest.mark.parametrize(
    "base_kind,strategy,freeze_bn",
    [(b, s, True) for b, s in CASES] + [("ste", "serial", False), ("reactnet", "bitfit", False)],  # + base.bn=adapt
)
def test_lean_training_is_bit_identical_to_standard(base_kind, strategy, freeze_bn, batch):
    standard, size, classes = build(base_kind, strategy, freeze_bn)
    lean = set_memory_mode(copy.deepcopy(standard), "lean")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    before = copy.deepcopy(standard.state_dict())
    losses_standard = train(standard, x, y)
    losses_lean = train(lean, x, y)
    assert losses_standard == losses_lean
    assert differing(standard, lean) == []
    changed = [n for n, v in standard.state_dict().items() if not torch.equal(v, before[n])]
    assert changed, "training changed nothing: the comparison would prove nothing"


@pytest.mark.parametrize("batch", [6, 64])
def test_lean_binary_linear_weight_gradient_is_autograds(batch):
    """The classifier of the STE net alone (320 -> 5, as above): input, weight and bias gradients."""
    torch.manual_seed(0)
    layer = BinaryLinear(320, 5)
    lean = make_lean(copy.deepcopy(layer))
    x = torch.randn(batch, 320) * 1.5  # some |x| > 1: the straight-through mask matters
    g = torch.randn(batch, 5)
    grads = []
    for module in (layer, lean):
        xi = x.clone().requires_grad_()
        module(xi).backward(g)
        grads.append((xi.grad, module.weight.grad, module.bias.grad))
        module.zero_grad(set_to_none=True)
    for expected, got, name in zip(grads[0], grads[1], ("input", "weight", "bias"), strict=True):
        assert torch.equal(expected, got), name
