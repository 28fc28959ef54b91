"""The two reference points of every thesis table: a new head alone, and full finetuning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError


@dataclass
class HeadOnlyOptions:
    """:class:`HeadOnly`'s options: the bits of the new head's weights (where it is fp32: ReActNet's)."""

    bits: int = 32


class HeadOnly(AdaptedModel):
    """Only a new classifier on the frozen base's pre-classifier features."""

    strategy = "head_only"
    options_class = HeadOnlyOptions
    feature_cache = True

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True, bits: int = 32):
        if self.trains_base and bits != 32:
            raise ConfigError(
                f"adapter.bits={bits!r} is invalid for {self.strategy}: it trains the base at its own precision; "
                "use adapter.bits=32"
            )
        super().__init__(base, num_classes, freeze_bn)
        self.head = base.new_head(base.stage_channels[-1], num_classes)
        if not self.trains_base:
            self.config = HeadOnlyOptions(bits)
            self.train_at_bits(bits)

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
    options_class = None
    trains_base = True
    feature_cache = False

    def introduced_modules(self) -> dict[str, list[nn.Module]]:
        body = [m for name, m in self.base.named_children() if name != "classifier"]
        return {"adapter": body, "head": [self.head]}
