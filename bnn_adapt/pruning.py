"""One-shot magnitude pruning of adapters (thesis chapter 6.4).

At ``epochs // 2``: structured L1 on depthwise-conv filters (whole filters,
dim 0) and unstructured L1 on the pointwise convs. Training uses Lightning's
:class:`~lightning.pytorch.callbacks.ModelPruning` (one instance per kind,
survivors are *not* rewound), which removes the masks at the end of training
and from every checkpoint it writes.
"""

from __future__ import annotations

from functools import partial

from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune


def mark_pruned(modules: list[nn.Module]) -> None:
    """Tell accounting that these weights count their non-zeros."""
    for m in modules:
        m.pruned_param_names = ("weight",)


def prune_now(model: nn.Module, depthwise_rate: float, pointwise_rate: float) -> None:
    """Prune an adapted model's adapter in place and make it permanent.

    Used where no training happens (``summary_only``): gives exactly the counts
    that :func:`pruning_callbacks` will leave.
    """
    depthwise, pointwise = model.prune_targets()
    for m in depthwise:
        if depthwise_rate > 0:
            prune.ln_structured(m, "weight", amount=depthwise_rate, n=1, dim=0)
            prune.remove(m, "weight")
    for m in pointwise:
        if pointwise_rate > 0:
            prune.l1_unstructured(m, "weight", amount=pointwise_rate)
            prune.remove(m, "weight")
    mark_pruned(depthwise + pointwise)


def is_pruning_epoch(epoch: int, at_epoch: int) -> bool:
    # ModelPruning runs at the end of a train epoch: pruning after epoch
    # at_epoch - 1 means epochs at_epoch.. train and evaluate pruned.
    return epoch == at_epoch - 1


def pruning_callbacks(
    model: nn.Module, depthwise_rate: float, pointwise_rate: float, at_epoch: int
) -> list[ModelPruning]:
    """Lightning callbacks that prune ``model``'s adapter once, before ``at_epoch``."""
    depthwise, pointwise = model.prune_targets()
    mark_pruned(depthwise + pointwise)
    when = partial(is_pruning_epoch, at_epoch=at_epoch)
    callbacks = []
    if depthwise and depthwise_rate > 0:
        callbacks.append(
            ModelPruning(
                "ln_structured",
                pruning_dim=0,
                pruning_norm=1,
                parameters_to_prune=[(m, "weight") for m in depthwise],
                amount=depthwise_rate,
                # per layer, as prune_now; Lightning's global default rejects
                # structured pruning outright
                use_global_unstructured=False,
                apply_pruning=when,
                use_lottery_ticket_hypothesis=False,
                verbose=1,
            )
        )
    if pointwise and pointwise_rate > 0:
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=[(m, "weight") for m in pointwise],
                amount=pointwise_rate,
                # per layer (round(rate * numel) zeros in each conv), as prune_now
                use_global_unstructured=False,
                apply_pruning=when,
                use_lottery_ticket_hypothesis=False,
                verbose=1,
            )
        )
    return callbacks
