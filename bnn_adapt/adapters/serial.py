"""Serial residual adapter (Rebuffi et al. 2017, "Learning multiple visual
domains with residual adapters"), as used in thesis chapter 6.2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel, resolve_groups
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError


class SerialAdapter(nn.Module):
    """``y = hardtanh(BN(conv1x1_g(BN(x)) + x))``; ``4C + C*C/g`` parameters.

    As in Rebuffi et al.'s code: the output BN normalises the *sum* of the
    1x1 branch and the identity, not the 1x1 branch alone.
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        self.norm_in = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.norm_out = nn.BatchNorm2d(channels)
        self.act = nn.Hardtanh()  # a layer, not F.hardtanh: lean training keeps its mask in 1 bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm_out(self.pointwise(self.norm_in(x)) + x))


@dataclass
class SerialOptions:
    """:class:`Serial`'s options: where the adapters go (1-based stages), groups of their 1x1 convs, weight bits."""

    stages: list[int]
    groups: int | str = 1
    bits: int = 32


class Serial(AdaptedModel):
    """Residual adapters after the chosen stages (1-based), thesis chapter 6.2."""

    strategy = "serial"
    options_class = SerialOptions
    sign_sensitive = True  # the next stage binarises its output

    @classmethod
    def describe(cls, options: dict) -> str:
        return f"serial stages {','.join(str(s) for s in options.get('stages', []))}"

    @classmethod
    def search_stages(cls, n_stages: int) -> list[list[int]]:
        """After every stage, the last two, or the last one."""
        return [list(range(1, n_stages + 1)), [n_stages - 1, n_stages], [n_stages]]

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        stages: list[int] = (1, 2, 3),
        groups: int | str = 1,
        freeze_bn: bool = True,
        bits: int = 32,
    ):
        super().__init__(base, num_classes, freeze_bn)
        n = len(base.stage_channels)
        stages = sorted({int(s) for s in stages})
        if not stages or any(s < 1 or s > n for s in stages):
            raise ConfigError(f"adapter.stages={stages} is invalid: this base has stages 1..{n}")
        self.stages = stages
        self.config = SerialOptions(stages, groups, bits)
        self.adapter = nn.ModuleDict(
            {
                str(s): SerialAdapter(c, resolve_groups(groups, c, c))
                for s, c in ((s, base.stage_channels[s - 1]) for s in stages)
            }
        )
        self.head = base.new_head(base.stage_channels[-1], num_classes)
        self.train_at_bits(bits)

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
