"""The two reference points of every thesis table: a new head alone, and full finetuning."""

from __future__ import annotations

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel
from bnn_adapt.bases.base import BaseNetwork


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
