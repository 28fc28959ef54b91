"""Binary convs and linears that hold their weights as bits and compute with the XNOR-popcount kernels.

Each layer keeps its float parameters' owners intact and caches what it folds
(packed weights, BN scale and shift) on the identity and version of the tensors
it came from, so a substituted tensor (BitFit, ``base.bn=adapt``, a finetuned
weight) is packed again. Inference only. Used by :mod:`.packed_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bnn_adapt.deploy.packed_kernels import (
    AFFINE,
    SCALE,
    ConvPlan,
    channel_vector,
    pack_signs,
    pack_weights,
    unpack_weights,
)
from bnn_adapt.errors import ExportError
from bnn_adapt.nn.folding import fold_batch_norm
from bnn_adapt.nn.layers import (
    BinaryLinear,
    BinaryModule,
    ternary_layer,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class PlanCache(dict):
    """Kernel plans of a module (they hold raw pointers into its tensors): a copied or pickled
    module starts with an empty cache and rebuilds them from its own tensors."""

    def __deepcopy__(self, memo) -> PlanCache:
        return PlanCache()

    def __reduce__(self):
        return PlanCache, ()


def cached(owner: nn.Module, role: str, sources: tuple, build: Callable):
    """``build()``, reused while every tensor in ``sources`` is the same object at the same
    version and every other value is equal (a substituted or updated tensor rebuilds it)."""
    versions = [s._version if isinstance(s, torch.Tensor) else s for s in sources]
    store = owner.__dict__.get("_packed_cache")
    if store is None:
        store = owner.__dict__["_packed_cache"] = PlanCache()
    hit = store.get(role)
    if (
        hit is not None
        and hit[1] == versions
        and all(a is b or not isinstance(a, torch.Tensor) for a, b in zip(hit[0], sources, strict=True))
    ):
        return hit[2]
    value = build()
    store[role] = (sources, versions, value)
    return value


def bn_sources(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def bn_arrays(bn: nn.modules.batchnorm._BatchNorm, c_out: int) -> dict[str, torch.Tensor]:
    alpha, beta = fold_batch_norm(bn)
    return {"alpha": channel_vector(alpha, c_out), "beta": channel_vector(beta, c_out)}


class PackedBinaryLayer(nn.Module, BinaryModule):
    """Binary weights held as bits; the layer computes ``sign(x) * sign(W)`` by XNOR-popcount.

    ``weight`` is a placeholder on the meta device (shape, no storage); a real
    tensor put in its place (an adapter's substituted weights) is packed and used.
    """

    clamp_latent = False

    def __init__(self, signs: torch.Tensor, weight_shape: torch.Size, stride: int, pad: int):
        super().__init__()
        self.kernel_shape = tuple(signs.shape)  # c_out, c_in, kh, kw
        self.step, self.pad = stride, pad
        self.weight = nn.Parameter(torch.empty(weight_shape, device="meta"), requires_grad=False)
        words, tap_pc = pack_weights(signs)
        self.register_buffer("weight_words", words, persistent=False)
        self.register_buffer("weight_tap_popcounts", tap_pc, persistent=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The state dict holds the +-1 weights, as the float layer's does (decoded on demand)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta:
            signs = unpack_weights(self.weight_words, self.kernel_shape)
            destination[prefix + "weight"] = signs.reshape(self.weight.shape)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Loading weights packs their signs (the placeholder stays a placeholder)."""
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and self.weight.is_meta:
            self.weight_words, self.weight_tap_popcounts = pack_weights(weight.detach().reshape(self.kernel_shape) >= 0)
            self.__dict__.pop("_packed_cache", None)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight is not None and key in missing_keys:
            missing_keys.remove(key)

    def packed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight.is_meta:
            return self.weight_words, self.weight_tap_popcounts
        return cached(
            self, "weight", (self.weight,), lambda: pack_weights(self.weight.detach().reshape(self.kernel_shape) >= 0)
        )

    def conv_plan(self, flags: int = 0, **arrays: torch.Tensor) -> ConvPlan:
        """The kernel call with this epilogue (``packed_kernels.ConvPlan``) on the current weights."""
        return ConvPlan(*self.packed_weight(), self.kernel_shape, self.step, self.pad, flags, **arrays)

    def plan(self, role: str, sources: tuple, epilogue: Callable[[], tuple[int, dict]]) -> ConvPlan:
        """:meth:`conv_plan` with the epilogue ``epilogue()`` gives; rebuilt when the weights or ``sources`` change."""

        def build() -> ConvPlan:
            flags, arrays = epilogue()
            return self.conv_plan(flags, **arrays)

        return cached(self, role, (self.weight, *sources), build)


class PackedBinaryConv2d(PackedBinaryLayer):
    """A binary conv on bits: STE's ``BinaryConv2d`` (sign of the input) or ReActNet's
    scaled conv (input already +-1; output times the stored per-channel ``scale``)."""

    binary_param_names = ("weight",)

    def __init__(self, signs: torch.Tensor, stride, padding, scale: torch.Tensor | None = None):
        step = stride if isinstance(stride, int) else stride[0]
        pad = padding if isinstance(padding, int) else padding[0]
        super().__init__(signs, signs.shape, step, pad)
        c_out, c_in, kh, kw = signs.shape
        self.in_channels, self.out_channels, self.kernel_size = c_in, c_out, (kh, kw)
        self.stride, self.padding = stride, padding  # as the float layer had them (LoRA copies them)
        if scale is not None:
            self.register_buffer("scale", scale.detach().float().clone())
        else:
            self.scale = None

    def float_plan(self) -> ConvPlan:
        if self.scale is None:
            return self.plan("float", (), lambda: (0, {}))
        scale = self.scale
        return self.plan("float", (scale,), lambda: (SCALE, {"scale": channel_vector(scale, self.out_channels)}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference_only(x)
        return self.float_plan()(pack_signs(x, self.pad))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.step}, "
            f"padding={self.pad}, packed"
        )


class PackedBinaryLinear(PackedBinaryLayer):
    """The STE head's binary linear, ``sign(x) sign(W)^T + bias``, as a 1x1 conv on bits."""

    binary_param_names = ("weight", "bias")

    def __init__(self, module: BinaryLinear, signs: torch.Tensor):
        super().__init__(signs[:, :, None, None], signs.shape, 1, 0)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.bias = module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference_only(x)
        c, bias = self.out_features, self.bias
        if bias is None:
            plan = self.plan("linear", (), lambda: (0, {}))
        else:
            plan = self.plan(
                "linear",
                (bias,),
                lambda: (AFFINE, {"alpha": channel_vector(torch.ones(c), c), "beta": channel_vector(bias, c)}),
            )
        out = plan(pack_signs(x.reshape(-1, self.in_features, 1, 1), 0))
        return out.reshape(*x.shape[:-1], c)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def inference_only(x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a base running on packed 1-bit kernels is for inference; use the float path to train")


def refuse_ternary(base: nn.Module) -> None:
    """A one-line refusal for a base whose activations can be 0 (``base.binarize=thesis_code``): packed
    bits hold -1/+1 only, and a zero needs a mask the packed format does not have."""
    ternary = ternary_layer(base)
    if ternary is not None:
        raise ExportError(
            f"a packed base holds +-1 bits, but {ternary} binarises as the thesis code (base.binarize=thesis_code: "
            "sign(0) = 0, ternary activations, which need a zero mask); adapt and evaluate it from its checkpoint "
            "instead"
        )
