"""Real-valued ResNet-18 (He et al. 2016): the fp32 reference the thesis compares its BNNs with.

Table 5.1/6.1 sets the STE BNN against a real-valued ResNet-18-like net trained on the
same CIFAR base split (:class:`ResNet18CIFAR`: 3x3 stem, no max-pool, as in the usual
CIFAR adaptation of ResNet); table 5.2 sets ReActNet-18 against the ImageNet
ResNet-18 (:class:`ResNet18`, layer for layer torchvision's ``resnet18``). Every
parameter is fp32. Both offer the :class:`BaseNetwork` interface, so they can also be
frozen and adapted like the binary bases.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bnn_adapt.bases.base import BaseNetwork, scaled


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> (+ shortcut) -> ReLU (torchvision's names)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)  # stage outputs are tapped: never modify them in place
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


class ResNet18(BaseNetwork):
    """ImageNet ResNet-18: 7x7/2 stem + max-pool, 4 stages of 2 blocks (64/128/256/512 x ``width``), fp32 linear."""

    arch = "resnet18"
    input_size = 224
    min_input_size = 32  # five halvings: stem conv, max-pool, stages 2-4

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        channels = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stage_channels = channels
        self.stem = self.make_stem(channels[0])
        stages, c_prev = [], channels[0]
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_prev, c, stride), BasicBlock(c, c)))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.classifier = self.new_head(channels[-1], num_classes)

    def make_stem(self, channels: int) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False),
                bn1=nn.BatchNorm2d(channels),
                relu=nn.ReLU(inplace=True),
                maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )


class ResNet18CIFAR(ResNet18):
    """ResNet-18 for 32x32 images: 3x3/1 stem conv, no max-pool (the thesis's real-valued reference)."""

    arch = "resnet18_cifar"
    input_size = 32
    min_input_size = 8  # stages 2-4 halve the resolution

    def make_stem(self, channels: int) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, channels, 3, stride=1, padding=1, bias=False),
                bn1=nn.BatchNorm2d(channels),
                relu=nn.ReLU(inplace=True),
            )
        )
