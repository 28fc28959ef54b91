"""The bases' blocks on packed layers: the STE basic block with its BN-then-sign folded into an
integer interval test (activations stay bits from conv1 to conv2), ReActNet's block with a fused
epilogue, and the float stems and shortcuts run channels-last with BN folded in.

Each packed form registers itself as the form of the float class it subclasses (:func:`packed_form`);
a block without one runs its layers one by one, its binary convs still on bits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.bases.reactnet import ReActBlock
from bnn_adapt.bases.ste_resnet import BasicBlock
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
    pack_signs,
)
from bnn_adapt.deploy.packed_layers import (
    INT32_MAX,
    INT32_MIN,
    PackedBinaryConv2d,
    bn_arrays,
    bn_sources,
    cached,
    inference_only,
)
from bnn_adapt.nn.folding import fold_batch_norm
from bnn_adapt.nn.layers import (
    ApproxSignActivation,
    ChannelsLastMaxPool2d,
    LearnableBias,
)
from bnn_adapt.nn.quantizers import sign

#: float class -> its packed form, filled by :func:`packed_form`
PACKED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {}


def packed_form(cls: type[nn.Module]) -> type[nn.Module]:
    """Register ``cls`` as the packed form of the float class it subclasses (its first base)."""
    PACKED_BLOCKS[cls.__bases__[0]] = cls
    return cls


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


@packed_form
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
        sources = (
            conv1.weight,
            conv2.weight,
            *bn_sources(bn1),
            self.act1.min_val,
            self.act1.max_val,
            *bn_sources(bn2),
            self.clip_after_add,
        )
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


@packed_form
class PackedReActBlock(ReActBlock):
    """ReActNet's block with its binary conv on bits and everything after it in the epilogue."""

    def adopt(self) -> None:
        """Once swapped in: its downsampling shortcut (as built) runs with BN folded."""
        if type(self.downsample) is nn.Sequential and len(self.downsample) == 3:
            self.downsample.__class__ = FoldedDownsample

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
        sources = (
            conv.weight,
            conv.scale,
            *bn_sources(bn),
            self.move0.bias,
            self.move1.bias,
            self.prelu.weight,
            self.move2.bias,
        )
        return cached(self, "fused", sources, self.build_plan)

    def build_plan(self) -> tuple[torch.Tensor, ConvPlan]:
        conv, c = self.binary_conv, self.binary_conv.out_channels
        tail = conv.conv_plan(
            SCALE | AFFINE | RESIDUAL | REACT,
            scale=channel_vector(conv.scale, c),
            **bn_arrays(self.bn1, c),
            bias1=channel_vector(self.move1.bias, c),
            slope=channel_vector(self.prelu.weight, c),
            bias2=channel_vector(self.move2.bias, c),
        )
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
    """ReActNet's fp32 stem on channels-last maps (oneDNN's NHWC conv and max pool are faster than the
    NCHW ones; no layout copies before the kernels, which read any layout), BN folded
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


@packed_form
class ChannelsLastOutMaxPool2d(ChannelsLastMaxPool2d):
    """The stem's max pool, leaving its output channels-last (a max is exact: same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices or torch.is_grad_enabled():
            return super().forward(x)
        return nn.MaxPool2d.forward(self, x.contiguous(memory_format=torch.channels_last))
