"""Structured pruning of the new classifier's input columns (``reduction.head_rate``).

One of the thesis's future-work reductions (SPEC 3). A pruned column drops one
input feature from the classifier. A binary classifier cannot express that
with zero weights (sign(0) = +1 in BinaryNet), so the mask lives in a buffer
(``kept_columns``) and is applied *after* binarisation; for an fp32 head the
result is the same as zeroing the column. Columns with the smallest L1 norm of
their (latent) weights go first.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.binary import BinaryLinear, BinaryModule, binarize


class ColumnPrunedLinear(nn.Module):
    """A linear layer whose input columns can be switched off by ``kept_columns``."""

    binary = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("kept_columns", torch.ones(in_features, dtype=torch.bool))

    @classmethod
    def wrap(cls, linear: nn.Linear) -> ColumnPrunedLinear:
        """The same layer (same parameter objects), now prunable by columns."""
        kind = BinaryColumnPrunedLinear if isinstance(linear, BinaryLinear) else ColumnPrunedLinear
        layer = kind(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.kept_columns.to(x.dtype)
        if self.binary:
            return F.linear(binarize(x), binarize(self.weight) * keep, self.bias)
        return F.linear(x, self.weight * keep, self.bias)

    def live_params(self, name: str) -> int:
        """What accounting counts: a pruned column's weights are gone."""
        if name == "weight":
            return int(self.kept_columns.sum()) * self.out_features
        return getattr(self, name).numel()

    def extra_repr(self) -> str:
        kept = int(self.kept_columns.sum())
        return f"in_features={self.in_features} ({kept} kept), out_features={self.out_features}"


class BinaryColumnPrunedLinear(ColumnPrunedLinear, BinaryModule):
    """:class:`ColumnPrunedLinear` of a binary head (bias counted binary, as BinaryLinear's)."""

    binary = True
    binary_param_names = ("weight", "bias")


def head_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the first linear layer of ``model.head``."""
    if isinstance(model.head, (nn.Linear, ColumnPrunedLinear)):
        return model, "head"
    for name, child in model.head.named_children():
        if isinstance(child, (nn.Linear, ColumnPrunedLinear)):
            return model.head, name
    raise TypeError(f"no linear layer in the head {model.head}")


def make_head_prunable(model: nn.Module) -> ColumnPrunedLinear:
    """Swap the head's linear layer for a :class:`ColumnPrunedLinear` (in place, idempotent)."""
    parent, attr = head_linear(model)
    layer = getattr(parent, attr)
    if not isinstance(layer, ColumnPrunedLinear):
        layer = ColumnPrunedLinear.wrap(layer)
        setattr(parent, attr, layer)
    return layer


@torch.no_grad()
def prune_head_columns(model: nn.Module, fraction: float) -> int:
    """Switch off the smallest-L1 kept columns until ``round(fraction * in_features)`` are off."""
    layer = make_head_prunable(model)
    target = round(fraction * layer.in_features)
    off = int((~layer.kept_columns).sum())
    if target <= off:
        return off
    norms = layer.weight.abs().sum(dim=0).masked_fill(~layer.kept_columns, float("inf"))
    layer.kept_columns[norms.argsort()[: target - off]] = False
    return target


class HeadColumnPruning(L.Callback):
    """Prune the head's columns at the end of the scheduled train epochs.

    ``schedule`` maps an epoch index to the cumulative fraction of columns
    switched off after it. The mask is a buffer: checkpoints (and resumed
    runs) keep it.
    """

    def __init__(self, model: nn.Module, schedule: dict[int, float]):
        self.model = model
        self.schedule = schedule

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        fraction = self.schedule.get(trainer.current_epoch)
        if fraction:
            prune_head_columns(self.model, fraction)
