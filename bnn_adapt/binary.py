"""Binary layers: sign binarisation with a straight-through gradient.

BinaryNet (Hubara et al. 2016): forward uses sign(x) (+1 for x >= 0); backward
passes the gradient straight through where |x| <= 1 and cancels it elsewhere
(the hardtanh derivative). Latent real weights live in [-1, 1] and are clamped
after every optimiser step (:func:`clamp_latent_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1 (also for -0.0), as in BinaryNet; never in place.

    sign(sign(x) + 0.5) maps -1/0/+1 to -1/+1/+1 in three cheap passes over one
    new tensor: several times faster on CPU than ``torch.where`` with filled
    tensors, which dominated the frozen base's forward pass (SPEC 7).
    """
    return torch.sign(x).add_(0.5).sign_()


class SignSTE(torch.autograd.Function):
    """sign(x) forward; gradient * 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


def frozen_binary_weight(module: nn.Module, binarize_weight) -> torch.Tensor | None:
    """``binarize_weight(module.weight)``, computed once and reused while the weight
    neither needs a gradient nor changes; None when it needs a gradient.

    A frozen base re-binarised all its weights on every forward pass (ReActNet-18:
    11 M weights, several passes each). The cache holds the parameter itself, so
    identity is reliable; any in-place change (optimiser step, clamping,
    ``load_state_dict``) bumps its version, and a new tensor changes identity or
    storage: each recomputes it. Pruned weights (plain tensors recomputed by a
    hook) are never cached.
    """
    weight = module._parameters.get("weight")
    if weight is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    cached = module.__dict__.get("_frozen_binary_weight")
    if cached is None or cached[0] is not weight or cached[1] != key:
        with torch.no_grad():
            cached = (weight, key, binarize_weight(weight))
        module.__dict__["_frozen_binary_weight"] = cached
    return cached[2]


class BinaryModule:
    """Marker for layers whose listed parameters are stored as 1 bit each.

    Accounting (SPEC 1.3) reads ``binary_param_names``; the optimiser hook
    reads ``clamp_latent`` to keep latent weights in [-1, 1].
    """

    binary_param_names: tuple[str, ...] = ("weight",)
    clamp_latent: bool = True


class BinaryConv2d(nn.Conv2d, BinaryModule):
    """Conv with sign-binarised weights and (unless ``binarize_input=False``) inputs.

    The STE net's stem keeps the real image input: ``binarize_input=False``.
    """

    def __init__(self, *args, binarize_input: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binarize_input:
            x = binarize(x)
        weight = frozen_binary_weight(self, sign)
        return self._conv_forward(x, binarize(self.weight) if weight is None else weight, self.bias)


class BinaryLinear(nn.Linear, BinaryModule):
    """Linear with sign-binarised inputs and weights; its bias counts as binary
    (the thesis's accounting) but stays real-valued in the forward pass."""

    binary_param_names = ("weight", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(binarize(x), binarize(self.weight), self.bias)


@torch.no_grad()
def clamp_latent_weights(model: nn.Module) -> None:
    """Clamp trainable latent parameters of binary layers to [-1, 1] (BinaryNet).

    Every parameter a layer lists in ``binary_param_names`` is clamped: the
    weights, and the binary linear's bias, which BinaryNet.pytorch clamps too
    (it sets ``bias.org``) and which accounting counts as binary.
    """
    for module in model.modules():
        if isinstance(module, BinaryModule) and module.clamp_latent:
            for name in module.binary_param_names:
                # a pruned layer keeps its latent weight as ``<name>_orig``
                p = getattr(module, f"{name}_orig", None)
                if not isinstance(p, nn.Parameter):
                    p = getattr(module, name, None)
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    p.clamp_(-1.0, 1.0)
