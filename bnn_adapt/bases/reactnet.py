"""ReActNet ResNet-18 for 224x224 ImageNet images.

Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized
Activation Functions", ECCV 2020, on the Bi-Real Net structure (Liu et al.
2018): every block holds one binary 3x3 conv and a real-valued shortcut.
Module names inside the stem and the blocks follow the authors' code
(github.com/liuzechun/ReActNet, ``resnet/``) so their released
``model_best.pth.tar`` loads through one small prefix table
(:mod:`bnn_adapt.bases.reactnet_checkpoint`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bnn_adapt.bases.base import BaseNetwork, scaled
from bnn_adapt.bases.reactnet_checkpoint import load_reactnet_checkpoint
from bnn_adapt.nn.layers import ApproxSignActivation, ChannelsLastMaxPool2d, LearnableBias, ScaledBinaryConv2d


class ReActBlock(nn.Module):
    """move0 -> sign -> binary conv3x3 -> BN -> (+ shortcut) -> move1 -> PReLU -> move2."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.move0 = LearnableBias(c_in)
        self.binarize = ApproxSignActivation()
        self.binary_conv = ScaledBinaryConv2d(c_in, c_out, stride=stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.move1 = LearnableBias(c_out)
        self.prelu = nn.PReLU(c_out)
        self.move2 = LearnableBias(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            # indices 0/1/2 match the authors' keys downsample.1.*, downsample.2.*
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=stride),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.binary_conv(self.binarize(self.move0(x))))
        return self.move2(self.prelu(self.move1(out + residual)))


class ReActNet18(BaseNetwork):
    """Stem (7x7/2 conv, BN, 3x3/2 maxpool), 4 stages of 4 blocks, fp32 linear head.

    Stages have 64/128/256/512 channels (x ``width``) at 56/28/14/7 pixels.
    """

    arch = "reactnet18"
    input_size = 224
    min_input_size = 32  # five halvings: stem conv, max-pool, stages 2-4
    load_released = staticmethod(load_reactnet_checkpoint)  # the authors' model_best.pth.tar

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        channels = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stage_channels = channels
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, channels[0], 7, stride=2, padding=3, bias=False),
                bn1=nn.BatchNorm2d(channels[0]),
                maxpool=ChannelsLastMaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        stages = []
        c_prev = channels[0]
        for i, c in enumerate(channels):
            blocks = [ReActBlock(c_prev, c, stride=1 if i == 0 else 2)]
            blocks += [ReActBlock(c, c) for _ in range(3)]
            stages.append(nn.Sequential(*blocks))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.classifier = self.new_head(channels[-1], num_classes)
