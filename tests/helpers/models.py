"""Small bases and adapted models with weights as training leaves them (non-trivial BN, both signs)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR
from bnn_adapt.training.pruning import PruningPlan, make_head_prunable, prune_head_columns

#: base name -> (constructor at a tiny width, image size)
BASES = {
    "ste": (lambda: STEResNetCIFAR(num_classes=5, width=0.1), 32),
    "reactnet": (lambda: ReActNet18(num_classes=10, width=0.125), 64),
}
#: what an exported adapter file records about its inputs and classes
PREPROCESS = {"image_size": 32, "mean": [0.4906, 0.4856, 0.4508], "std": [0.2454, 0.2415, 0.2620]}
CLASSES = {"udta": ["ant", "bee", "cat", "dog"], "lora": ["elm", "fir", "oak", "yew"]}


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine params and running stats, so BN placement matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def realistic_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affine params away from their (0, 1) initial values."""
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return model


def trained_like(module: nn.Module, seed: int) -> None:
    """Weights as training leaves them: non-trivial BN, non-zero LoRA up-projections, perturbed latents."""
    randomize_bn(module, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def make_base(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    make, size = BASES[name]
    torch.manual_seed(seed)
    base = make()
    trained_like(base, seed)
    with torch.no_grad():  # ReActNet's init is tiny and positive: give the binary weights both signs
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return base.eval(), size


def adapted(
    strategy: str, base: nn.Module, variant: str = "plain", bits: int | None = None, jitter: float = 0.0
) -> nn.Module:
    """``strategy`` on ``base`` as a finished run leaves it (``variant``: plain, pruned, bn_drift;
    ``bits``: adapter.bits; ``jitter``: noise on the adapter and head, weights of both signs and sizes)."""
    if strategy == "full_finetune" or variant == "bn_drift":
        base = copy.deepcopy(base)  # training changes (or, with base.bn=adapt, drifts) the run's own base copy
    model = STRATEGIES[strategy](base, num_classes=4, **({"bits": bits} if bits is not None else {}))
    if model.adapter is not None:
        trained_like(model.adapter, 1)
    trained_like(model.head, 2)
    if jitter:
        with torch.no_grad():
            for p in [*(model.adapter.parameters() if model.adapter is not None else []), *model.head.parameters()]:
                p.add_(torch.randn_like(p) * jitter)
    if strategy == "full_finetune":
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # flips some binary signs too
    if variant == "bn_drift":
        randomize_bn(base, 3)
    if variant == "pruned":
        PruningPlan(0.5, 0.9, (1,)).apply(model)
        make_head_prunable(model)
        prune_head_columns(model, 0.5)
    return model.eval()
