"""Packed execution of a stored base: its binary layers run on bits, XNOR-popcount.

:func:`use_packed_kernels` turns a base (as :mod:`bnn_adapt.packed_base` rebuilds
it) into one whose binary convs and linears hold their weights as bits only and
compute on bit-packed activations with the kernels of :mod:`.packed_kernels`
(integer dot products, exact); the fp32 stem, BN, activations and the adapters
stay float. Per block:

* STE ResNet (SPEC 1.1): ``x`` is packed once for conv1 and the 1x1 shortcut;
  ``sign(hardtanh(BN1(conv1)))`` is a per-channel interval test on conv1's
  integer output, so conv2's input never leaves bits; BN2, hardtanh, the
  residual (and the shortcut's BN) are applied by conv2's kernel epilogue.
* ReActNet-18 (SPEC 1.2): ``sign(x + move0)`` is packed from the float input;
  the epilogue applies the per-channel scale, BN, the shortcut (computed by
  torch: average pool, fp32 1x1 conv, BN), move1, PReLU and move2.

Module names, parameters of the float parts and ``isinstance`` checks stay as
they were (blocks change class in place, as :mod:`bnn_adapt.lean` does), so
adapters attach and run as on the float base: they read the same stage
outputs, hook binary convs (LoRA: such a block runs its layers one by one),
substitute BN tensors (BitFit, ``base.bn=adapt``) or binary weights
(``full_finetune``); every folded value is recomputed when a tensor it came
from changes. The binary weights themselves are placeholders on the ``meta``
device: the base stays in bits while it predicts. Inference only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.bases import rebuild
from bnn_adapt.bases.reactnet import ReActBlock, ReActNet18
from bnn_adapt.bases.ste_resnet import BasicBlock
from bnn_adapt.deploy import packed_kernels as kernels
from bnn_adapt.deploy.packed_base import parse_packed, read_packed_base, to_packed_modules
from bnn_adapt.deploy.packed_kernels import (
    AFFINE,
    CLAMP_AFTER,
    CLAMP_BEFORE,
    OUT_BITS,
    REACT,
    RESIDUAL,
    SCALE,
    ConvPlan,
    channel_vector,
    fold_batch_norm,
    pack_signs,
    pack_weights,
    unpack_weights,
)  # fmt: skip
from bnn_adapt.errors import ExportError
from bnn_adapt.nn.layers import (
    ApproxSignActivation,
    BinaryConv2d,
    BinaryLinear,
    BinaryModule,
    ChannelsLastMaxPool2d,
    LearnableBias,
    PackedScaledBinaryConv2d,
)  # fmt: skip
from bnn_adapt.nn.quantizers import sign

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
        and all(a is b or not isinstance(a, torch.Tensor) for a, b in zip(hit[0], sources))
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        """Loading weights packs their signs (the placeholder stays a placeholder)."""
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and self.weight.is_meta:
            self.weight_words, self.weight_tap_popcounts = pack_weights(weight.detach().reshape(self.kernel_shape) >= 0)
            self.__dict__.pop("_packed_cache", None)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        if weight is not None and key in missing_keys:
            missing_keys.remove(key)

    def packed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight.is_meta:
            return self.weight_words, self.weight_tap_popcounts
        return cached(self, "weight", (self.weight,),
                      lambda: pack_weights(self.weight.detach().reshape(self.kernel_shape) >= 0))  # fmt: skip

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
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.step}, "
                f"padding={self.pad}, packed")  # fmt: skip


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
            plan = self.plan("linear", (bias,), lambda: (AFFINE, {
                "alpha": channel_vector(torch.ones(c), c), "beta": channel_vector(bias, c)}))  # fmt: skip
        out = plan(pack_signs(x.reshape(-1, self.in_features, 1, 1), 0))
        return out.reshape(*x.shape[:-1], c)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def inference_only(x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a base running on packed 1-bit kernels is for inference; use the float path to train")


def runs_as_is(*modules: nn.Module) -> bool:
    """No hooks and no training mode: a block may run its fused kernels instead of its layers."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return all(not (m.training or m._forward_hooks or m._forward_pre_hooks) for m in modules if m is not None)


def sign_interval(bn: nn.Module, act: nn.Module, reach: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``[lo, hi]`` per channel: the integers d in [-reach, reach] with ``sign(act(bn(d))) = +1``.

    Found by running the float layers themselves on every integer a conv can
    produce (laid out as the float model's conv output), so the test on the
    integer is exactly the float model's decision, whatever the sign of gamma
    (gamma = 0: all or none). Rounding is monotonic, so the set is an
    interval; None if it were not (the block then runs its layers one by one).
    """
    values = torch.arange(-reach, reach + 1, dtype=torch.float32)
    n, c = len(values), bn.num_features
    width = -(-n // 64) * 64  # whole vectors, like the float model's feature maps
    grid = torch.cat([values, values[-1:].expand(width - n)]).expand(c, width).reshape(1, c, 1, width).contiguous()
    with torch.no_grad():
        on = sign(act(bn(grid)))[0, :, 0, :n] > 0
    index = torch.arange(n)
    lo = torch.where(on, index, n).amin(dim=1)
    hi = torch.where(on, index, -1).amax(dim=1)
    if not torch.equal(on, (index >= lo[:, None]) & (index <= hi[:, None])):
        return None
    empty = ~on.any(dim=1)
    lo = torch.where(empty, INT32_MAX, lo - reach).to(torch.int32)
    hi = torch.where(empty, INT32_MIN, hi - reach).to(torch.int32)
    return lo, hi


def is_unit_hardtanh(m: nn.Module) -> bool:
    return isinstance(m, nn.Hardtanh) and m.min_val == -1.0 and m.max_val == 1.0


def plain_shortcut(shortcut: nn.Module) -> bool:
    """The STE downsampling shortcut as built: a packed 1x1 conv, then BN."""
    return (
        len(shortcut) == 2 and isinstance(shortcut[0], PackedBinaryConv2d) and isinstance(shortcut[1], nn.BatchNorm2d)
    )


class PackedBasicBlock(BasicBlock):
    """The STE basic block with its binary convs on bits, fused as the module docstring says."""

    def fusable(self) -> bool:
        shortcut = self.shortcut
        return (
            isinstance(self.conv1, PackedBinaryConv2d)
            and isinstance(self.conv2, PackedBinaryConv2d)
            and isinstance(self.bn1, nn.BatchNorm2d)
            and isinstance(self.bn2, nn.BatchNorm2d)
            and is_unit_hardtanh(self.act1)
            and is_unit_hardtanh(self.act2)
            and (shortcut is None or plain_shortcut(shortcut))
            and runs_as_is(self, self.conv1, self.bn1, self.act1, self.conv2, self.bn2, self.act2, *(shortcut or ()))
        )

    def fused_plans(self) -> tuple[ConvPlan | None, ConvPlan, ConvPlan] | None:
        """(shortcut conv + BN, conv1 writing ``sign(act1(bn1(.)))`` as bits, conv2 + BN + hardtanh +
        residual), rebuilt when a tensor they fold changes; None if the signs are no interval."""
        conv1, conv2, bn1, bn2, shortcut = self.conv1, self.conv2, self.bn1, self.bn2, self.shortcut
        sources = (conv1.weight, conv2.weight, *bn_sources(bn1), self.act1.min_val, self.act1.max_val,
                   *bn_sources(bn2), self.clip_after_add)  # fmt: skip
        if shortcut is not None:
            sources += (shortcut[0].weight, *bn_sources(shortcut[1]))
        return cached(self, "fused", sources, self.build_plans)

    def build_plans(self) -> tuple[ConvPlan | None, ConvPlan, ConvPlan] | None:
        conv1, conv2 = self.conv1, self.conv2
        interval = sign_interval(self.bn1, self.act1, conv1.in_channels * conv1.kernel_size[0] * conv1.kernel_size[1])
        if interval is None:
            return None
        lo, hi = (channel_vector(t, conv1.out_channels, torch.int32) for t in interval)
        signs = conv1.conv_plan(OUT_BITS, lo=lo, hi=hi)
        clip = CLAMP_AFTER if self.clip_after_add else CLAMP_BEFORE
        tail = conv2.conv_plan(AFFINE | clip | RESIDUAL, **bn_arrays(self.bn2, conv2.out_channels))
        shortcut = None
        if self.shortcut is not None:
            conv, bn = self.shortcut
            shortcut = conv.conv_plan(AFFINE, **bn_arrays(bn, conv.out_channels))
        return shortcut, signs, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plans = self.fused_plans() if self.fusable() else None
        if plans is None:
            return super().forward(x)
        inference_only(x)
        shortcut, signs, tail = plans
        bits = pack_signs(x, max(signs.pad, shortcut.pad if shortcut else 0))
        residual = x if shortcut is None else shortcut(bits)
        return tail(signs(bits, out_pad=tail.pad), residual)


class PackedReActBlock(ReActBlock):
    """ReActNet's block with its binary conv on bits and everything after it in the epilogue."""

    def fusable(self) -> bool:
        return (
            isinstance(self.binary_conv, PackedBinaryConv2d)
            and self.binary_conv.scale is not None
            and isinstance(self.binarize, ApproxSignActivation)
            and all(isinstance(m, LearnableBias) for m in (self.move0, self.move1, self.move2))
            and isinstance(self.bn1, nn.BatchNorm2d)
            and isinstance(self.prelu, nn.PReLU)
            and runs_as_is(
                self, self.move0, self.binarize, self.binary_conv, self.bn1, self.move1, self.prelu, self.move2
            )
        )

    def fused_plan(self) -> tuple[torch.Tensor, ConvPlan]:
        """(move0's bias for packing, the conv with scale, BN, move1, PReLU and move2 in its epilogue),
        rebuilt when a tensor they fold changes."""
        conv, bn = self.binary_conv, self.bn1
        sources = (conv.weight, conv.scale, *bn_sources(bn), self.move0.bias, self.move1.bias, self.prelu.weight,
                   self.move2.bias)  # fmt: skip
        return cached(self, "fused", sources, self.build_plan)

    def build_plan(self) -> tuple[torch.Tensor, ConvPlan]:
        conv, c = self.binary_conv, self.binary_conv.out_channels
        tail = conv.conv_plan(
            SCALE | AFFINE | RESIDUAL | REACT, scale=channel_vector(conv.scale, c), **bn_arrays(self.bn1, c),
            bias1=channel_vector(self.move1.bias, c), slope=channel_vector(self.prelu.weight, c),
            bias2=channel_vector(self.move2.bias, c),
        )  # fmt: skip
        return self.move0.bias.detach().float().reshape(-1).contiguous(), tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable():
            return super().forward(x)
        inference_only(x)
        bias, tail = self.fused_plan()
        residual = x if self.downsample is None else self.downsample(x)
        return tail(pack_signs(x, tail.pad, bias), residual)


def conv_with_bn(owner: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` as one fp32 conv: weights times BN's per-channel scale, BN's shift as the bias
    (one pass less over the feature map; equal up to float rounding)."""

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        alpha, beta = fold_batch_norm(bn)
        weight = conv.weight.detach().float() * alpha.view(-1, 1, 1, 1)
        bias = beta if conv.bias is None else torch.addcmul(beta, alpha, conv.bias.detach().float())
        return weight.contiguous(memory_format=torch.channels_last), bias

    weight, bias = cached(owner, "conv+bn", (conv.weight, conv.bias, *bn_sources(bn)), fold)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and not torch.is_grad_enabled()


class ChannelsLastStem(nn.Sequential):
    """ReActNet's fp32 stem on channels-last maps (oneDNN's NHWC conv and max pool: 2.4x faster than the
    NCHW conv at batch 1 here; no layout copies before the kernels, which read any layout), BN folded
    into the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        conv, bn, *rest = self
        if not (foldable(conv, bn) and runs_as_is(self, conv, bn)):
            return super().forward(x)
        x = conv_with_bn(self, conv, bn, x)
        for module in rest:
            x = module(x)
        return x


class FoldedDownsample(nn.Sequential):
    """ReActNet's downsampling shortcut (average pool, fp32 1x1 conv, BN) with BN folded into the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, conv, bn = self
        if not (foldable(conv, bn) and runs_as_is(self, pool, conv, bn)):
            return super().forward(x)
        return conv_with_bn(self, conv, bn, pool(x))


class ChannelsLastOutMaxPool2d(ChannelsLastMaxPool2d):
    """The stem's max pool, leaving its output channels-last (a max is exact: same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices or torch.is_grad_enabled():
            return super().forward(x)
        return nn.MaxPool2d.forward(self, x.contiguous(memory_format=torch.channels_last))


PACKED_BLOCKS = {
    BasicBlock: PackedBasicBlock, ReActBlock: PackedReActBlock, ChannelsLastMaxPool2d: ChannelsLastOutMaxPool2d,
}


def packed_layer(module: nn.Module, signs: torch.Tensor) -> PackedBinaryLayer | None:
    """The packed replacement of a binary layer whose input is binarised (not the STE stem,
    which reads the image), with weight signs ``signs``; None for any other module."""
    if isinstance(module, PackedScaledBinaryConv2d):
        return PackedBinaryConv2d(signs, module.stride, module.padding, torch.ones(signs.shape[0]))
    if isinstance(module, BinaryConv2d) and module.binarize_input:
        return PackedBinaryConv2d(signs, module.stride, module.padding)
    if isinstance(module, BinaryLinear):
        return PackedBinaryLinear(module, signs)
    return None


def swap_blocks(base: nn.Module) -> nn.Module:
    for module in base.modules():
        if type(module) in PACKED_BLOCKS:
            module.__class__ = PACKED_BLOCKS[type(module)]
    if isinstance(base, ReActNet18) and type(base.stem) is nn.Sequential and len(base.stem) == 3:
        base.stem.__class__ = ChannelsLastStem
    for module in base.modules():
        if isinstance(module, ReActBlock) and type(module.downsample) is nn.Sequential and len(module.downsample) == 3:
            module.downsample.__class__ = FoldedDownsample
    base.packed_kernels = True
    return base.eval().requires_grad_(False)


def use_packed_kernels(base: nn.Module) -> nn.Module:
    """Run ``base``'s binary convs and linears on bits from now on (in place; returns it).

    Binary layers whose input is binarised (not the STE stem, which reads the
    image) become :class:`PackedBinaryConv2d` / :class:`PackedBinaryLinear`
    holding their weights as bits; their fp32 weights are freed.
    """
    if kernels.library() is None:
        raise RuntimeError("the packed 1-bit kernels are not built; reinstall with a C compiler (make install)")
    for name, module in list(base.named_modules()):
        if isinstance(module, PackedBinaryLayer) or getattr(module, "weight", None) is None:
            continue
        packed = packed_layer(module, module.weight.detach() >= 0)
        if packed is not None:
            if isinstance(packed, PackedBinaryConv2d) and packed.scale is not None:
                packed.scale = module.scale.detach().float().clone()
            if isinstance(packed, PackedBinaryLinear):
                packed.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, packed)
    return swap_blocks(base)


def load_packed_base(path: str | Path) -> tuple[nn.Module, dict]:
    """A packed base file straight onto the kernels: ``(base, header)``.

    The network is laid out on the meta device, each binary layer is built from
    its own bits and every other tensor takes its stored value, so no fp32 copy
    of a packed weight exists at any time (:func:`read_packed_base` + :func:`use_packed_kernels`
    give the same base after decoding every weight to fp32).
    """
    path = Path(path)
    if not path.is_file():
        return read_packed_base(path)  # its error message
    header, entries, binary, values = parse_packed(path.read_bytes(), str(path))
    with torch.device("meta"):
        base = to_packed_modules(rebuild(header["arch"], header["arch_config"]))
    bits = np.frombuffer(binary, np.uint8)
    state, b, v = {}, 0, 0
    for name, kind, shape in entries:
        count = int(np.prod(shape)) if shape else 1
        if kind == "fp32":
            state[name] = values[v : v + count].reshape(shape)
            v += count
            continue
        chunk = np.unpackbits(bits[b // 8 : (b + count + 7) // 8 + 1], bitorder="little")[b % 8 : b % 8 + count]
        signs = torch.from_numpy(chunk.astype(bool)).reshape(shape)
        b += count
        owner, _, _ = name.rpartition(".")
        packed = packed_layer(base.get_submodule(owner), signs)
        if packed is None:  # a binary layer that stays float: the STE stem
            state[name] = torch.where(signs, 1.0, -1.0)
        else:
            parent, _, child = owner.rpartition(".")
            setattr(base.get_submodule(parent), child, packed)
    expected = {k for k, t in base.state_dict().items() if t.is_floating_point()}
    if not set(state) <= expected or any(not k.endswith(".weight") for k in expected - set(state)):
        wrong = sorted(set(state) ^ expected)[:5]
        raise ExportError(f"{path}: its layout does not fit a {header['arch']} {header['arch_config']} ({wrong})")
    base.load_state_dict(state, strict=False, assign=True)
    for module in base.modules():  # what the file leaves out (BN's batch counters) on the CPU
        for key, t in list(module._buffers.items()):
            if t is not None and t.is_meta:
                module._buffers[key] = torch.zeros(t.shape, dtype=t.dtype)
    return swap_blocks(base), header


def load_base(path: str | Path, packed: bool = True) -> tuple[nn.Module, dict]:
    """A packed base file on the 1-bit kernels (``packed`` and built) or on fp32 convs."""
    if packed and kernels.library() is not None:
        return load_packed_base(path)
    return read_packed_base(path)


def uses_packed_kernels(base: nn.Module) -> bool:
    return bool(getattr(base, "packed_kernels", False))


def packed_or_float(base: nn.Module, packed: bool = True) -> nn.Module:
    """``base`` on the 1-bit kernels when ``packed`` and they are built, else as it is (float);
    a missing kernel library costs one warning line."""
    if packed and not uses_packed_kernels(base) and kernels.library() is not None:
        return use_packed_kernels(base)
    return base
