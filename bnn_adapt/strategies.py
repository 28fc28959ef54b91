"""Adaptation strategies: how a frozen base, an adapter and a new head combine.

Each strategy is a plain ``nn.Module`` (usable in a notebook without Hydra or
Lightning) exposing ``base``, ``adapter`` (or ``None``) and ``head``. All but
:class:`FullFinetune` freeze the base; with ``freeze_bn=True`` the base's BN
layers also keep their running statistics (the thesis let them drift: use
``freeze_bn=False`` to reproduce that, SPEC section 6).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bnn_adapt.adapters import UDTA, SerialAdapter
from bnn_adapt.adapters.bitfit import BitFitAdapter, substituted
from bnn_adapt.adapters.lora import LoRAAdapter
from bnn_adapt.adapters.udta import thin_block_shapes
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError


def divisors_of_all(*numbers: int) -> list[int]:
    return [d for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)]


def resolve_groups(groups: int | str, c_in: int, c_out: int) -> int:
    """``groups`` as configured (an int or ``"channels"`` = one group per input
    channel) -> a value valid for a c_in -> c_out 1x1 conv."""
    value = c_in if groups == "channels" else groups
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or c_in % value or c_out % value:
        raise ConfigError(
            f"reduction.groups={groups!r} does not divide a {c_in}->{c_out} channel 1x1 conv; "
            f"valid values: {divisors_of_all(c_in, c_out)} or 'channels'"
        )
    return value


class AdaptedModel(nn.Module):
    """Base + optional adapter + new head for ``num_classes`` target classes."""

    strategy: str
    trains_base = False
    #: reads the base only through ``frozen_features``, so a tap cache can stand in for it
    feature_cache = False

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True):
        super().__init__()
        self.base = base
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        self.adapter: nn.Module | None = None
        # constructor arguments beyond (base, num_classes, freeze_bn): an exported adapter rebuilds from them
        self.options: dict = {}
        if not self.trains_base:
            base.requires_grad_(False)

    def base_frozen_in_eval(self) -> bool:
        return not self.trains_base and self.freeze_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if self.base_frozen_in_eval():
            self.base.eval()
        return self

    def introduced_modules(self) -> dict[str, list[nn.Module]]:
        """What this task adds on top of the stored base (for size accounting)."""
        return {"adapter": [self.adapter] if self.adapter is not None else [], "head": [self.head]}

    def prune_targets(self) -> tuple[list[nn.Conv2d], list[nn.Conv2d]]:
        """(depthwise convs, pointwise convs) of the adapter, for pruning."""
        depthwise, pointwise = [], []
        if self.adapter is not None:
            for m in self.adapter.modules():
                if isinstance(m, nn.Conv2d):
                    is_depthwise = m.groups == m.in_channels and m.kernel_size != (1, 1)
                    (depthwise if is_depthwise else pointwise).append(m)
        return depthwise, pointwise

    def base_context(self):
        """No autograd through the base when nothing in it can learn."""
        return contextlib.nullcontext() if self.trains_base else torch.no_grad()

    def can_cache_features(self) -> bool:
        """Whether ``frozen_features`` may be computed once and reused (adapter.cache_taps):
        the base neither learns nor updates BN statistics."""
        return self.feature_cache and self.base_frozen_in_eval()


class HeadOnly(AdaptedModel):
    """Only a new classifier on the frozen base's pre-classifier features."""

    strategy = "head_only"
    feature_cache = True

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True):
        super().__init__(base, num_classes, freeze_bn)
        self.head = base.new_head(base.stage_channels[-1], num_classes)

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the head reads from the base: [pre-classifier features]."""
        with self.base_context():
            return [self.base.pre_classifier(self.base.stage_outputs(x)[-1])]

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``x``: images, or what :meth:`frozen_features` returned for them (a tap cache)."""
        features = x if isinstance(x, (list, tuple)) else self.frozen_features(x)
        return self.head(features[0])


class FullFinetune(HeadOnly):
    """New head, every base parameter trainable (thesis lr 1e-4)."""

    strategy = "full_finetune"
    trains_base = True
    feature_cache = False

    def introduced_modules(self) -> dict[str, list[nn.Module]]:
        body = [m for name, m in self.base.named_children() if name != "classifier"]
        return {"adapter": body, "head": [self.head]}


class Serial(AdaptedModel):
    """Residual adapters after the chosen stages (1-based), thesis chapter 6.2."""

    strategy = "serial"

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        stages: list[int] = (1, 2, 3),
        groups: int | str = 1,
        freeze_bn: bool = True,
    ):
        super().__init__(base, num_classes, freeze_bn)
        n = len(base.stage_channels)
        stages = sorted({int(s) for s in stages})
        if not stages or any(s < 1 or s > n for s in stages):
            raise ConfigError(f"adapter.stages={stages} is invalid: this base has stages 1..{n}")
        self.stages = stages
        self.options = {"stages": stages, "groups": groups}
        self.adapter = nn.ModuleDict(
            {
                str(s): SerialAdapter(c, resolve_groups(groups, c, c))
                for s, c in ((s, base.stage_channels[s - 1]) for s in stages)
            }
        )
        self.head = base.new_head(base.stage_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.stages[0]
        with torch.no_grad():  # nothing before the first adapter learns
            x = self.base.stem(x)
            for stage in self.base.stages[: first - 1]:
                x = stage(x)
        for index in range(first, len(self.base.stages) + 1):
            x = self.base.stages[index - 1](x)
            if str(index) in self.adapter:
                x = self.adapter[str(index)](x)
        return self.head(self.base.pre_classifier(x))


class Parallel(AdaptedModel):
    """UDTA thin blocks beside the frozen base (thesis chapters 6.4-6.7).

    ``head="concat"`` classifies [base features ; adapter vector];
    ``head="adapter"`` the adapter vector alone.
    """

    strategy = "udta"
    feature_cache = True

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        head: str = "concat",
        groups: int | str = 1,
        freeze_bn: bool = True,
    ):
        super().__init__(base, num_classes, freeze_bn)
        if head not in ("concat", "adapter"):
            raise ConfigError(f"adapter.head={head!r} is invalid: use 'concat' or 'adapter'")
        self.head_mode = head
        self.options = {"head": head, "groups": groups}
        shapes = thin_block_shapes(base.stage_channels)
        self.adapter = UDTA(base.stage_channels, [resolve_groups(groups, ci, co) for ci, co in shapes])
        in_features = self.adapter.out_features + (base.stage_channels[-1] if head == "concat" else 0)
        self.head = base.new_head(in_features, num_classes)

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


def chosen_stages(stages, n: int) -> list[int]:
    """``adapter.stages`` (1-based; null = every stage) as a sorted list, checked against the base."""
    chosen = list(range(1, n + 1)) if stages is None else sorted({int(s) for s in stages})
    if not chosen or any(s < 1 or s > n for s in chosen):
        raise ConfigError(f"adapter.stages={list(stages)} is invalid: this base has stages 1..{n}")
    return chosen


class LoRA(AdaptedModel):
    """Low-rank fp32 branches beside the binary convs of the chosen stages (future work, SPEC 2).

    The binary base is untouched (the branches hook in while this model runs);
    gradients flow back through the frozen base from the first adapted stage.
    """

    strategy = "lora"

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        rank: int = 4,
        alpha: float | None = None,
        stages: list[int] | None = None,
        freeze_bn: bool = True,
    ):
        super().__init__(base, num_classes, freeze_bn)
        stages = chosen_stages(stages, len(base.stages))
        alpha = float(rank if alpha is None else alpha)
        self.stages = stages
        self.options = {"rank": rank, "alpha": alpha, "stages": stages}
        self.adapter = LoRAAdapter(base, stages, rank, alpha)
        self.head = base.new_head(base.stage_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.stages[0]
        with torch.no_grad():  # nothing before the first adapted stage learns
            x = self.base.stem(x)
            for stage in self.base.stages[: first - 1]:
                x = stage(x)
        with self.adapter.injected(self.base):
            for stage in self.base.stages[first - 1 :]:
                x = stage(x)
            features = self.base.pre_classifier(x)
        return self.head(features)


class BitFit(AdaptedModel):
    """Only the base's BN affine params, learnable biases and PReLU slopes train
    (as a task-specific copy in the adapter), plus the new head (future work, SPEC 2)."""

    strategy = "bitfit"

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True):
        super().__init__(base, num_classes, freeze_bn)
        self.adapter = BitFitAdapter(base)
        self.head = base.new_head(base.stage_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with substituted(self.base, self.adapter.overrides()):
            features = self.base.pre_classifier(self.base.stage_outputs(x)[-1])
        return self.head(features)


STRATEGIES = {cls.strategy: cls for cls in (HeadOnly, FullFinetune, Serial, Parallel, LoRA, BitFit)}
