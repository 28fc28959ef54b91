"""Real-valued ResNets (He et al. 2016): the fp32 references the thesis compares its BNNs with.

Table 5.1/6.1 sets the STE BNN against BinaryNet.pytorch's real-valued CIFAR ResNet-18
(:class:`ResNetCIFAR`: He et al.'s CIFAR ResNet, 3 stages of 16/32/64 channels, about
0.17 M parameters, a net of similar memory to the 1-bit one) trained on the same CIFAR-10
classes 0-4; table 5.2 sets ReActNet-18 against the ImageNet ResNet-18 (:class:`ResNet18`,
layer for layer torchvision's ``resnet18``). :class:`ResNet18CIFAR` (the ImageNet widths
with a 3x3 stem, 11 M parameters) is kept as a larger reference. Every parameter is fp32.
All offer the :class:`BaseNetwork` interface, so they can also be frozen and adapted.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bnn_adapt.bases.base import BaseNetwork, scaled
from bnn_adapt.errors import ConfigError


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
    """ResNet-18 for 32x32 images: 3x3/1 stem conv, no max-pool (64-512 channels, 11 M parameters)."""

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


class ResNetCIFAR(BaseNetwork):
    """He et al.'s CIFAR ResNet as BinaryNet.pytorch builds it (``resnet(dataset="cifar10", depth=18)``).

    3x3 stem conv 3->16 -> BN -> ReLU, no max-pool; 3 stages of ``(depth - 2) // 6`` basic blocks
    with 16/32/64 channels (x ``width``) at strides 1/2/2, a 1x1 conv + BN shortcut where the
    shape changes; global average pool -> fp32 linear(64 -> C). Convs start from N(0, 2 / (k*k*c_out)),
    as BinaryNet.pytorch's ``init_model``. Depth 18: 2 blocks per stage, 174,933 parameters for 5 classes.
    """

    arch = "resnet_cifar"
    input_size = 32
    min_input_size = 4  # stages 2 and 3 halve the resolution
    arch_limits = {**BaseNetwork.arch_limits, "depth": (8, 110)}

    def __init__(self, num_classes: int = 10, width: float = 1.0, depth: int = 18):
        super().__init__()
        if (depth - 2) // 6 < 1:  # BinaryNet.pytorch: n = int((depth - 2) / 6) blocks per stage
            raise ConfigError(f"base.net.depth={depth} is invalid: a CIFAR ResNet needs depth >= 8")
        self.num_classes, self.width, self.depth = num_classes, width, depth
        channels = [scaled(c, width) for c in (16, 32, 64)]
        self.stage_channels = channels
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False),
                bn1=nn.BatchNorm2d(channels[0]),
                relu=nn.ReLU(inplace=True),
            )
        )
        blocks, stages, c_prev = (depth - 2) // 6, [], channels[0]
        for i, c in enumerate(channels):
            layers = [BasicBlock(c_prev, c, stride=1 if i == 0 else 2)] + [BasicBlock(c, c) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.classifier = self.new_head(channels[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def arch_config(self) -> dict:
        return {"num_classes": self.num_classes, "width": self.width, "depth": self.depth}
