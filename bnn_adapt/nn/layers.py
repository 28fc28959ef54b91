"""Binary layers: convolutions and linears whose weights are stored as 1 bit each.

Layers take their binarisation from :mod:`bnn_adapt.nn.quantizers`; every
binary layer is a :class:`BinaryModule`, which tells accounting which of its
parameters count as 1 bit and tells the optimiser hook which latent weights
to clamp to [-1, 1] (BinaryNet). Also here: ReActNet's learnable bias and
approx-sign activation, the deployed (packed) form of its scaled conv, a
linear layer whose input columns can be pruned, and the adapters' conv and
linear layers trained below 32 bits (:class:`QuantConv2d`, :class:`QuantLinear`:
Larq's ``QuantConv2D`` with a ``kernel_quantizer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.nn.quantizers import (
    BINARIZERS,
    ChannelQuantizer,
    ScaledSignSTE,
    SignBinarizer,
    approx_sign,
    scaled_sign,
    sign,
)


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
    if torch.compiler.is_compiling():  # a compiled graph binarises in it; a cache would make it recompile
        return binarize_weight(weight)
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    cached = module.__dict__.get("_frozen_binary_weight")
    if cached is None or cached[0] is not weight or cached[1] != key:
        with torch.no_grad():
            cached = (weight, key, binarize_weight(weight))
        module.__dict__["_frozen_binary_weight"] = cached
    return cached[2]


class BinaryModule:
    """Marker for layers whose listed parameters are stored as 1 bit each.

    Accounting reads ``binary_param_names`` (sizes) and ``binary_input`` (operation counts, as Larq's
    summary reads a layer's quantizers); the optimiser hook reads ``clamp_latent`` to keep latent
    weights in [-1, 1].
    """

    binary_param_names: tuple[str, ...] = ("weight",)
    clamp_latent: bool = True
    #: whether its input arrives as signs (its own sign, or a block's approx-sign before it, as ReActNet's):
    #: then each multiply-accumulate is an XNOR-popcount, else a real one
    binary_input: bool = True


STE = BINARIZERS["ste"]


class BinaryConv2d(nn.Conv2d, BinaryModule):
    """Conv with weights and (unless ``binarize_input=False``) inputs binarised by ``binarizer``.

    The STE net's stem keeps the real image input: ``binarize_input=False``.
    """

    def __init__(self, *args, binarize_input: bool = True, binarizer: SignBinarizer = STE, **kwargs):
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input
        self.binarizer = binarizer

    @property
    def binary_input(self) -> bool:
        return self.binarize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binarize_input:
            x = self.binarizer(x)
        weight = frozen_binary_weight(self, self.binarizer.frozen)
        return self._conv_forward(x, self.binarizer(self.weight) if weight is None else weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.binarizer.name == "ste" else f", binarizer={self.binarizer}")


class BinaryLinear(nn.Linear, BinaryModule):
    """Linear with weights and (unless ``binarize_input=False``) inputs binarised by ``binarizer``; its bias
    counts as binary (the thesis's accounting) but stays real-valued in the forward pass."""

    binary_param_names = ("weight", "bias")

    def __init__(self, *args, binarize_input: bool = True, binarizer: SignBinarizer = STE, **kwargs):
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input
        self.binarizer = binarizer

    @property
    def binary_input(self) -> bool:
        return self.binarize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.binarizer(x) if self.binarize_input else x, self.binarizer(self.weight), self.bias)


def ternary_layer(model: nn.Module) -> str | None:
    """The name of the first layer of ``model`` whose binarizer keeps zeros (sign(0) = 0: ``base.binarize=
    thesis_code``), which 1-bit storage of its signs cannot hold; None when there is none."""
    return next((n for n, m in model.named_modules() if getattr(m, "binarizer", STE).ternary), None)


def latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable latent parameters of ``model``'s binary layers, each once: what BinaryNet clamps
    to [-1, 1] after every optimiser step.

    Every parameter a layer with ``clamp_latent`` lists in ``binary_param_names``: the weights, and
    the binary linear's bias, which BinaryNet.pytorch clamps too (it sets ``bias.org``) and which
    accounting counts as binary. A pruned layer keeps its latent weight as ``<name>_orig``
    (``torch.nn.utils.prune``); frozen parameters and fp32 or quantised layers are left out.
    Walking the modules costs more than clamping, so training lists them once
    (:class:`bnn_adapt.training.module.Classifier`) and clamps the list with :func:`clamp_to_unit_`.
    """
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BinaryModule) and module.clamp_latent:
            for name in module.binary_param_names:
                p = getattr(module, f"{name}_orig", None)
                if not isinstance(p, nn.Parameter):
                    p = getattr(module, name, None)
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    found[id(p)] = p
    return list(found.values())


@torch.no_grad()
def clamp_to_unit_(weights: list[torch.Tensor]) -> None:
    """Clamp every tensor of ``weights`` to [-1, 1] in place, in two multi-tensor kernels
    (``torch._foreach_clamp_min_`` / ``_max_``, as fused optimisers do) instead of one per tensor."""
    if weights:
        torch._foreach_clamp_min_(weights, -1.0)
        torch._foreach_clamp_max_(weights, 1.0)


def clamp_latent_weights(model: nn.Module) -> None:
    """Clamp :func:`latent_weights` of ``model`` to [-1, 1] (BinaryNet)."""
    clamp_to_unit_(latent_weights(model))


class ScaledBinaryConv2d(nn.Module, BinaryModule):
    """Bias-free conv whose weights are sign(W) * mean|W| per output channel.

    Its input is used as given: the block binarises it after a learnable bias.
    Latent weights are not clamped (ReActNet trains them unclamped).
    """

    binary_param_names = ("weight",)
    clamp_latent = False

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.stride = stride
        self.padding = padding
        # the authors' initialisation: small positive uniform values
        self.weight = nn.Parameter(torch.rand(c_out, c_in, kernel_size, kernel_size) * 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = frozen_binary_weight(self, scaled_sign)
        weight = ScaledSignSTE.apply(self.weight) if weight is None else weight
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return f"{c_in}, {c_out}, kernel_size={k}, stride={self.stride}, padding={self.padding}"


class ApproxSignActivation(nn.Module):
    """:func:`approx_sign` as a layer, so lean training (bnn_adapt.lean) can swap it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_sign(x)


class LearnableBias(nn.Module):
    """Per-channel shift (ReActNet's RSign/RPReLU thresholds), shape (1, C, 1, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that, when no gradient is needed on CPU, pools a channels-last copy.

    The NCHW CPU kernel also computes indices and is much slower than the NHWC
    one, even with both layout copies, and the stem's max pool is a large share of
    a frozen base's forward pass (docs/speed.md). A max is exact, so the
    output is identical; with autograd the NCHW kernel's backward is faster,
    so training takes the usual path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.return_indices
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class PackedScaledBinaryConv2d(ScaledBinaryConv2d):
    """ReActNet's binary conv as deployed: ``scale * sign(W)`` with the scale stored.

    Training recomputes ``scale = mean|W|`` from latent weights; a packed base
    keeps only their signs, so the per-output-channel scale is a stored buffer
    (c_out fp32 values) and the forward multiplies the same two tensors.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__(c_in, c_out, kernel_size, stride, padding)
        self.register_buffer("scale", torch.ones(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.scale.view(-1, 1, 1, 1) * sign(self.weight)
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)


class ColumnPrunedLinear(nn.Module):
    """A linear layer whose input columns can be switched off by ``kept_columns``."""

    binary = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("kept_columns", torch.ones(in_features, dtype=torch.bool))

    @classmethod
    def wrap(cls, linear: nn.Linear) -> ColumnPrunedLinear:
        """The same layer (same parameter objects and weight quantizer), now prunable by columns."""
        kind = BinaryColumnPrunedLinear if isinstance(linear, BinaryLinear) else ColumnPrunedLinear
        layer = kind(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight_quantizer = getattr(linear, "weight_quantizer", None)
        layer.binarizer = getattr(linear, "binarizer", STE)
        layer.binarize_input = getattr(linear, "binarize_input", True)
        return layer

    weight_quantizer: ChannelQuantizer | None = None
    binarizer: SignBinarizer = STE  # a binary head's (BinaryLinear's)
    binarize_input: bool = True

    def effective_weight(self) -> torch.Tensor:
        """The weight with switched-off columns zeroed (then quantised, below 32 bits): what an fp32 head uses."""
        weight = self.weight * self.kept_columns.to(self.weight.dtype)
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary:
            x = self.binarizer(x) if self.binarize_input else x
            return F.linear(x, self.binarizer(self.weight) * self.kept_columns.to(x.dtype), self.bias)
        return F.linear(x, self.effective_weight(), self.bias)

    def live_params(self, name: str) -> int:
        """What accounting counts: a pruned column's weights are gone."""
        if name == "weight":
            return int(self.kept_columns.sum()) * self.out_features
        return getattr(self, name).numel()

    def extra_repr(self) -> str:
        kept = int(self.kept_columns.sum())
        return f"in_features={self.in_features} ({kept} kept), out_features={self.out_features}"


class BinaryColumnPrunedLinear(ColumnPrunedLinear, BinaryModule):
    """:class:`ColumnPrunedLinear` of a binary head (bias counted binary, as BinaryLinear's)."""

    binary = True
    binary_param_names = ("weight", "bias")

    @property
    def binary_input(self) -> bool:
        return self.binarize_input


# --------------------------------------------------------------------------- weights below 32 bits


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight goes through ``weight_quantizer`` (a :class:`ChannelQuantizer`) in
    every forward pass: trained quantisation-aware, stored at ``weight_quantizer.bits`` (``adapter.bits``)."""

    def __init__(self, *args, weight_quantizer: ChannelQuantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_quantizer={self.weight_quantizer}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` counterpart of :class:`QuantConv2d` (an fp32 head trained below 32 bits)."""

    def __init__(self, *args, weight_quantizer: ChannelQuantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_quantizer={self.weight_quantizer}"


def _quantized_copy(layer: nn.Module, bits: int) -> nn.Module:
    quantizer = ChannelQuantizer(bits)
    if type(layer) is nn.Conv2d:
        new = QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            weight_quantizer=quantizer,
            device="meta",
        )
    else:
        new = QuantLinear(
            layer.in_features, layer.out_features, layer.bias is not None, weight_quantizer=quantizer, device="meta"
        )
    new.weight, new.bias = layer.weight, layer.bias  # the same parameter objects
    new.train(layer.training)
    return new


def quantization_pays(layer: nn.Module, bits: int) -> bool:
    """Whether ``bits`` per weight plus one fp32 scale per output channel take fewer bits than fp32 weights:
    not for rows of one weight (a pointwise conv with as many groups as input channels)."""
    row = layer.weight[0].numel()
    return row * bits + 32 < 32 * row


def quantize_weights(module: nn.Module, bits: int) -> nn.Module:
    """Every plain fp32 ``nn.Conv2d`` / ``nn.Linear`` in ``module`` (itself included) trained at ``bits`` bits from
    now on, where that saves memory (:func:`quantization_pays`); binary layers stay binary, BN and biases fp32.
    Returns ``module``, or its replacement when ``module`` itself is such a layer; 32 bits changes nothing."""
    if bits == 32:
        return module
    if type(module) in (nn.Conv2d, nn.Linear):
        return _quantized_copy(module, bits) if quantization_pays(module, bits) else module
    for name, child in list(module.named_children()):
        replacement = quantize_weights(child, bits)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def weight_bits(module: nn.Module) -> int:
    """The width ``module.weight`` is stored at below 32 bits (0: not quantised)."""
    quantizer = getattr(module, "weight_quantizer", None)
    return quantizer.bits if quantizer is not None else 0


def quantized_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of a quantised layer's weight as its forward uses it (pruned columns zeroed)."""
    weight = module.weight
    if isinstance(module, ColumnPrunedLinear):
        weight = weight * module.kept_columns.to(weight.dtype)
    return module.weight_quantizer.encode(weight)
