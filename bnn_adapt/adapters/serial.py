"""Serial residual adapter (Rebuffi et al. 2017, "Learning multiple visual
domains with residual adapters"), as used in thesis chapter 6.2."""

from __future__ import annotations

import torch
from torch import nn


class SerialAdapter(nn.Module):
    """``y = hardtanh(BN(conv1x1_g(BN(x)) + x))``; ``4C + C*C/g`` parameters.

    As in Rebuffi et al.'s code: the output BN normalises the *sum* of the
    1x1 branch and the identity, not the 1x1 branch alone (SPEC 2).
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        self.norm_in = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.norm_out = nn.BatchNorm2d(channels)
        self.act = nn.Hardtanh()  # a layer, not F.hardtanh: lean training keeps its mask in 1 bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm_out(self.pointwise(self.norm_in(x)) + x))
