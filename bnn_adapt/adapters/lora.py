"""Low-rank fp32 branches beside binary convs (LoRA, Hu et al. 2021), one of the
thesis's future-work adapters: ``y = conv_b(x) + (alpha/r) * up(down(x))``.

The base stays untouched: a branch is attached with a forward hook only while
the adapted model runs (:meth:`LoRAAdapter.injected`), so one base object can
serve many adapters and its state dict and parameter counts never change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel, chosen_stages
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import BinaryModule


class LoRABranch(nn.Module):
    """``down``: k x k conv c_in -> r (the binary conv's stride and padding, random
    init); ``up``: 1x1 conv r -> c_out (zero init, so training starts at the base).

    Parameters: ``r * (c_in * k * k + c_out)``.
    """

    def __init__(self, conv: nn.Module, rank: int, alpha: float):
        super().__init__()
        c_out, c_in, kh, kw = conv.weight.shape
        self.down = nn.Conv2d(c_in, rank, (kh, kw), stride=conv.stride, padding=conv.padding, bias=False)
        self.up = nn.Conv2d(rank, c_out, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scaling = float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scaling


class _AddBranch:
    """Forward hook: the conv's output plus the branch applied to the conv's input."""

    def __init__(self, branch: LoRABranch):
        self.branch = branch

    def __call__(self, module, inputs, output):
        return output + self.branch(inputs[0])


def binary_convs(stage: nn.Module) -> dict[str, nn.Module]:
    """The binary convolutions inside ``stage`` (BinaryConv2d, ReActNet's scaled conv)."""
    return {
        name: m
        for name, m in stage.named_modules()
        if isinstance(m, BinaryModule) and getattr(m, "weight", None) is not None and m.weight.dim() == 4
    }


class LoRAAdapter(nn.Module):
    """One :class:`LoRABranch` per binary conv of the chosen stages (1-based)."""

    def __init__(self, base: nn.Module, stages: list[int], rank: int, alpha: float):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"adapter.rank={rank!r} is invalid: it must be a positive integer")
        targets = {}
        for s in stages:
            for name, conv in binary_convs(base.stages[s - 1]).items():
                targets[f"stages.{s - 1}.{name}"] = conv
        if not targets:
            raise ConfigError(f"adapter=lora found no binary convs in stages {stages} of base {base.arch}")
        self.targets = list(targets)
        # ModuleDict keys may not contain '.': the branch for stages.0.0.conv1 is "stages/0/0/conv1"
        self.branches = nn.ModuleDict(
            {name.replace(".", "/"): LoRABranch(conv, rank, alpha) for name, conv in targets.items()}
        )

    @contextlib.contextmanager
    def injected(self, base: nn.Module):
        """Within this block, every target conv of ``base`` adds its branch."""
        handles = [
            base.get_submodule(name).register_forward_hook(_AddBranch(self.branches[name.replace(".", "/")]))
            for name in self.targets
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class LoRAOptions:
    """:class:`LoRA`'s options: rank r, scale alpha / r, the stages whose binary convs get branches, weight bits."""

    rank: int
    alpha: float
    stages: list[int]
    bits: int = 32


class LoRA(AdaptedModel):
    """Low-rank fp32 branches beside the binary convs of the chosen stages (thesis future work).

    The binary base is untouched (the branches hook in while this model runs);
    gradients flow back through the frozen base from the first adapted stage.
    """

    strategy = "lora"
    options_class = LoRAOptions
    sign_sensitive = True  # its branches add to binary convs' outputs, which the next layer binarises

    @classmethod
    def describe(cls, options: dict) -> str:
        stages = options.get("stages")
        return f"lora r={options.get('rank')}" + (f" stages {','.join(str(s) for s in stages)}" if stages else "")

    def __init__(
        self,
        base: BaseNetwork,
        num_classes: int,
        rank: int = 4,
        alpha: float | None = None,
        stages: list[int] | None = None,
        freeze_bn: bool = True,
        bits: int = 32,
    ):
        super().__init__(base, num_classes, freeze_bn)
        stages = chosen_stages(stages, len(base.stages))
        alpha = float(rank if alpha is None else alpha)
        self.stages = stages
        self.config = LoRAOptions(rank, alpha, stages, bits)
        self.adapter = LoRAAdapter(base, stages, rank, alpha)
        self.head = base.new_head(base.stage_channels[-1], num_classes)
        self.train_at_bits(bits)

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
