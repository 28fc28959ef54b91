"""What every frozen base network offers the adapters.

A base is a stem, a list of stages whose outputs adapters may tap, a
pre-classifier (pooling to a vector) and a classifier. Adapters only use this
interface, so a new base needs no change elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    """A layer's channels at width multiplier ``width`` (at least one)."""
    return max(1, int(round(channels * width)))


class BaseNetwork(nn.Module):
    """Interface shared by :class:`STEResNetCIFAR` and :class:`ReActNet18`."""

    #: output channels of each stage (taps f1..fS)
    stage_channels: list[int]
    #: expected input side length in pixels, and the smallest that works
    input_size: int
    min_input_size: int
    #: name used in configs and checkpoints
    arch: str
    #: BatchNorms whose output only ever reaches a sign function, whatever adapter runs: a packed
    #: base stores each as an exact per-channel threshold (:mod:`bnn_adapt.bases.fingerprint`)
    sign_only_norms: tuple[str, ...] = ()

    stem: nn.Module
    stages: nn.ModuleList
    classifier: nn.Module

    num_classes: int
    width: float

    def pre_classifier(self, last_stage_output: torch.Tensor) -> torch.Tensor:
        """Stage-S output -> the vector the classifier reads (ResNet's: global average pool)."""
        return last_stage_output.mean(dim=(2, 3))

    def new_head(self, in_features: int, num_classes: int) -> nn.Module:
        """A fresh classifier of this base's kind (ResNet's: an fp32 linear with bias)."""
        return nn.Linear(in_features, num_classes)

    def arch_config(self) -> dict:
        """Constructor arguments, stored in checkpoints and exports."""
        return {"num_classes": self.num_classes, "width": self.width}

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All stage outputs f1..fS (real-valued; never binarised in place)."""
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_classifier(self.stage_outputs(x)[-1]))
