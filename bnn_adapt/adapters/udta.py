"""Parallel "unidirectional thin adapter" (Sun et al. 2022, UDTA) as simplified
by the thesis (chapter 6.4): thin blocks tap every stage of the frozen base and
run beside it, so the base never needs a backward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bnn_adapt.adapters.strategy import AdaptedModel, resolve_groups
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError


class ThinBlock(nn.Module):
    """``h = ReLU(BN(dwconv3x3(x))) + x``; ``out = BN(conv1x1_g(h))``.

    Parameters: ``c_in*(9 + 2) + c_in*c_out/g + 2*c_out``.
    """

    def __init__(self, c_in: int, c_out: int, groups: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False)
        self.pointwise_norm = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.depthwise_norm(self.depthwise(x))) + x
        return self.pointwise_norm(self.pointwise(h))


def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """On CPU, oneDNN's 1x1 conv backward is faster on channels-last (NHWC) maps than on
    NCHW ones, and the thin blocks are mostly 1x1 convs (docs/speed.md)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def thin_block_shapes(stage_channels: list[int]) -> list[tuple[int, int]]:
    """Block k maps stage k's channels to stage k+1's; the last keeps its own."""
    outs = list(stage_channels[1:]) + [stage_channels[-1]]
    return list(zip(stage_channels, outs, strict=True))


class UDTA(nn.Module):
    """``a1 = pool(block1(f1))``, ``a_k = pool(block_k(f_k + a_{k-1}))``.

    Each block's output is average-pooled to the next tap's spatial size; the
    last one globally, giving the adapter vector.
    """

    def __init__(self, stage_channels: list[int], groups: list[int] | int = 1):
        super().__init__()
        shapes = thin_block_shapes(stage_channels)
        if isinstance(groups, int):
            groups = [groups] * len(shapes)
        self.blocks = nn.ModuleList(ThinBlock(ci, co, g) for (ci, co), g in zip(shapes, groups, strict=True))
        self.out_features = shapes[-1][1]

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        carried = None
        for k, (block, tap) in enumerate(zip(self.blocks, taps, strict=True)):
            tap = channels_last_on_cpu(tap)
            y = block(tap if carried is None else tap + carried)
            if k + 1 < len(taps):
                carried = F.adaptive_avg_pool2d(y, taps[k + 1].shape[-2:])
            else:
                carried = y.mean(dim=(2, 3))
        return carried


@dataclass
class UDTAOptions:
    """:class:`Parallel`'s options: what the classifier reads, groups of the thin blocks' 1x1 convs, weight bits."""

    head: str = "concat"
    groups: int | str = 1
    bits: int = 32


class Parallel(AdaptedModel):
    """UDTA thin blocks beside the frozen base (thesis chapters 6.4-6.7).

    ``head="concat"`` classifies [base features ; adapter vector];
    ``head="adapter"`` the adapter vector alone.
    """

    strategy = "udta"
    options_class = UDTAOptions
    feature_cache = True

    @classmethod
    def describe(cls, options: dict) -> str:
        return f"udta head={options.get('head')}"

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        head: str = "concat",
        groups: int | str = 1,
        freeze_bn: bool = True,
        bits: int = 32,
    ):
        super().__init__(base, num_classes, freeze_bn)
        if head not in ("concat", "adapter"):
            raise ConfigError(f"adapter.head={head!r} is invalid: use 'concat' or 'adapter'")
        self.head_mode = head
        self.config = UDTAOptions(head, groups, bits)
        shapes = thin_block_shapes(base.stage_channels)
        self.adapter = UDTA(base.stage_channels, [resolve_groups(groups, ci, co) for ci, co in shapes])
        in_features = self.adapter.out_features + (base.stage_channels[-1] if head == "concat" else 0)
        self.head = base.new_head(in_features, num_classes)
        self.train_at_bits(bits)

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output (the taps), then with ``head="concat"`` the base's
        pre-classifier features; computed without autograd: no gradient ever
        reaches the base, so nothing of it is kept for backward."""
        with torch.no_grad():
            features = self.base.stage_outputs(x)
            if self.head_mode == "concat":
                features.append(self.base.pre_classifier(features[-1]))
        return features

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``x``: images, or what :meth:`frozen_features` returned for them (a tap cache)."""
        features = list(x) if isinstance(x, (list, tuple)) else self.frozen_features(x)
        vector = self.adapter(features[: len(self.base.stages)])
        if self.head_mode == "concat":
            vector = torch.cat([features[-1], vector], dim=1)
        return self.head(vector)

    def kept_rows(self) -> dict[str, torch.Tensor]:
        """A pruned thin block's depthwise conv and its BN lose their dead filters (thesis 6.4)."""
        found = {}
        for name, m in self.adapter.named_modules():
            if isinstance(m, ThinBlock):
                dead = (m.depthwise.weight.detach().flatten(1) == 0).all(dim=1)
                if dead.any():
                    found[f"{name}.depthwise"] = found[f"{name}.depthwise_norm"] = ~dead
        return found
