"""BinaryNet-style ResNet for 32x32 images.

After Courbariaux/Hubara's BinaryNet.pytorch ``resnet_binary`` (CIFAR, depth
18, inflate 5): binary convs with straight-through gradients, BN and hardtanh.
``binarize="thesis_code"`` binarises as the thesis's own code does (its
:class:`~bnn_adapt.nn.quantizers.ThesisCodeBinarizer`, the shortcut reading the
binarised input, its initialisation); that code's checkpoints load as this base
(:mod:`bnn_adapt.bases.thesis_checkpoint`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnn_adapt.bases.base import BaseNetwork, scaled
from bnn_adapt.bases.thesis_checkpoint import load_thesis_checkpoint
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import BinaryConv2d, BinaryLinear
from bnn_adapt.nn.quantizers import binarizer

#: ``block``: where the second hardtanh sits (docs/concepts.md, Bases)
BLOCKS = ("thesis", "binarynet")


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> hardtanh -> conv3x3 -> BN -> hardtanh, + shortcut (``block="thesis"``).

    The thesis's network (its Table 9.1, the authors' final ``resnet_binary.py``)
    clips before the addition, so a stage output (what adapters tap) is not
    clipped. ``block="binarynet"`` is BinaryNet.pytorch's original block, which
    clips after the addition: a different network, kept as an option.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, block: str = "thesis", binarize: str = "ste"):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"base.block={block!r} is invalid: use one of {', '.join(BLOCKS)}")
        self.clip_after_add = block == "binarynet"
        self.binarizer = b = binarizer(binarize)
        self.conv1 = BinaryConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, binarizer=b)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.Hardtanh()
        self.conv2 = BinaryConv2d(c_out, c_out, 3, padding=1, bias=False, binarizer=b)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.Hardtanh()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                BinaryConv2d(c_in, c_out, 1, stride=stride, bias=False, binarizer=b), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binarizer.in_place:  # conv1 binarised the tensor the shortcut then reads (the thesis code)
            x = self.binarizer(x)
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.clip_after_add:
            return self.act2(out + residual)
        return self.act2(out) + residual


class STEResNetCIFAR(BaseNetwork):
    """Stem 3->80, stages of 80/160/320 channels (x ``width``), 2 blocks each."""

    arch = "ste_resnet_cifar"
    input_size = 32
    # BN1d -> hardtanh feeds only binary classifiers (every head of this base binarises its input). The
    # blocks' bn1 -> hardtanh -> conv2 is not listed: LoRA's branch beside conv2 reads the real values.
    sign_only_norms = ("feature_norm",)
    min_input_size = 4  # stages 2 and 3 halve the resolution
    arch_limits = {**BaseNetwork.arch_limits, "blocks_per_stage": (1, 8)}
    load_foreign = staticmethod(load_thesis_checkpoint)  # the thesis code's ResNet_cifar10 files

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        blocks_per_stage: int = 2,
        block: str = "thesis",
        binarize: str = "ste",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.blocks_per_stage = blocks_per_stage
        self.block = block
        self.binarize = binarize
        self.binarizer = b = binarizer(binarize)
        channels = [scaled(c, width) for c in (80, 160, 320)]
        self.stage_channels = channels
        self.stem = nn.Sequential(
            BinaryConv2d(3, channels[0], 3, padding=1, bias=False, binarize_input=False, binarizer=b),
            nn.BatchNorm2d(channels[0]),
            nn.Hardtanh(),
        )
        stages = []
        c_prev = channels[0]
        for i, c in enumerate(channels):
            blocks = [BasicBlock(c_prev, c, stride=1 if i == 0 else 2, block=block, binarize=binarize)]
            blocks += [BasicBlock(c, c, block=block, binarize=binarize) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.feature_norm = nn.BatchNorm1d(channels[-1])
        self.classifier = self.new_head(channels[-1], num_classes)
        if b.name == "thesis_code":
            self.init_as_thesis_code()

    @torch.no_grad()
    def init_as_thesis_code(self) -> None:
        """The thesis code's ``init_model``: binary convs from N(0, 2 / (k*k*c_out)), BatchNorm2d weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, BinaryConv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def pre_classifier(self, last_stage_output: torch.Tensor) -> torch.Tensor:
        """Global avg pool -> BN1d -> hardtanh."""
        pooled = last_stage_output.mean(dim=(2, 3))
        return nn.functional.hardtanh(self.feature_norm(pooled))

    def new_head(self, in_features: int, num_classes: int) -> nn.Module:
        """Binary linear (with bias) -> BN1d, as the original head."""
        b = self.binarizer
        linear = BinaryLinear(
            in_features, num_classes, binarize_input=b.binarizes_linear_input(in_features), binarizer=b
        )
        return nn.Sequential(linear, nn.BatchNorm1d(num_classes))

    def arch_config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "width": self.width,
            "blocks_per_stage": self.blocks_per_stage,
            "block": self.block,
            "binarize": self.binarize,
        }
