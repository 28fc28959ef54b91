"""Pruning the adapter and the new classifier (thesis chapter 6.4): one plan, worked out once.

``reduction=prune`` prunes once before epoch ``max_epochs // 2`` (the thesis):
structured L1 on depthwise-conv filters (whole filters, dim 0) and
unstructured L1 on the pointwise convs, per layer. ``reduction=prune_iterative``
does the same in rounds, each removing the same fraction of what is left
(Frankle & Carbin 2019), optionally rewinding the survivors.
``reduction.head_rate`` also switches off the new classifier's input columns
with the smallest L1 norm, in the same rounds.

A :class:`PruningPlan` is made from the reduction config (:meth:`PruningPlan.from_config`)
and is the one place that knows the rates, the rounds and their epochs: it
checks the schedule, prepares a model (:meth:`~PruningPlan.prepare`), gives the
training callbacks (Lightning's :class:`~lightning.pytorch.callbacks.ModelPruning`,
survivors not reset unless ``rewind``), prunes at once where nothing trains
(:meth:`~PruningPlan.apply`, ``summary_only``: the very counts training will
leave) and says which epochs count for the headline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

from bnn_adapt.adapters.strategy import make_head_prunable
from bnn_adapt.errors import ConfigError

PRUNING_REDUCTIONS = ("prune", "prune_iterative")


def per_round_fraction(rate: float, rounds: int) -> float:
    """The fraction of what is left that each of ``rounds`` equal rounds prunes to reach ``rate``.

    PyTorch's repeated pruning counts ``amount`` against the still-unpruned
    weights, so ``rounds`` rounds of ``1 - (1 - rate) ** (1 / rounds)`` leave
    ``(1 - rate)`` of them (up to rounding per round); Frankle & Carbin 2019.
    """
    return rate if rounds == 1 else 1.0 - (1.0 - rate) ** (1.0 / rounds)


def cumulative_fraction(rate: float, round_index: int, rounds: int) -> float:
    """Fraction pruned after round ``round_index`` (1-based) of the geometric schedule."""
    return rate if round_index == rounds else 1.0 - (1.0 - rate) ** (round_index / rounds)


def iterative_schedule(rounds: int, at_epochs, max_epochs: int) -> list[int]:
    """The epochs before which each round prunes (as ``at_epoch`` for one-shot pruning).

    Default: spread evenly, ``k * max_epochs // (rounds + 1)`` for k = 1..rounds,
    so training goes on after the last round as long as between rounds.
    """
    if rounds < 1:
        raise ConfigError(f"reduction.rounds={rounds!r} is invalid: it must be a positive integer")
    if at_epochs is None:
        epochs = [k * max_epochs // (rounds + 1) for k in range(1, rounds + 1)]
        if len(set(epochs)) < rounds or epochs[0] < 1:
            raise ConfigError(
                f"reduction.rounds={rounds} needs trainer.max_epochs >= {rounds + 1} (it is {max_epochs}), "
                "or list the epochs in reduction.at_epochs"
            )
        return epochs
    epochs = [int(e) for e in at_epochs]
    if len(epochs) != rounds or epochs != sorted(set(epochs)) or epochs[0] < 1 or epochs[-1] >= max_epochs:
        raise ConfigError(
            f"reduction.at_epochs={epochs} is invalid: give {rounds} increasing epochs in 1..{max_epochs - 1} "
            "(one per round), or null to spread them evenly"
        )
    return epochs


def is_round_epoch(epoch: int, at_epochs: tuple[int, ...]) -> bool:
    """ModelPruning runs at the end of a train epoch: pruning after epoch ``at - 1``
    means epochs ``at``.. train and evaluate pruned."""
    return epoch + 1 in at_epochs


def is_pruning_epoch(epoch: int, at_epoch: int) -> bool:
    return is_round_epoch(epoch, (at_epoch,))


def pruning_epochs(reduction, max_epochs: int) -> tuple[int, ...]:
    """The epochs before which a pruning reduction prunes, whatever its rates (empty: it never prunes)."""
    if reduction.get("name") not in PRUNING_REDUCTIONS:
        return ()
    if reduction.name == "prune_iterative":
        return tuple(iterative_schedule(reduction.rounds, reduction.get("at_epochs"), max_epochs))
    at = reduction.get("at_epoch")
    return (int(at) if at is not None else max(1, max_epochs // 2),)


@dataclass(frozen=True)
class PruningPlan:
    """Rates, and the epochs before which each round prunes (one epoch for one-shot pruning)."""

    depthwise_rate: float
    pointwise_rate: float
    epochs: tuple[int, ...]
    head_rate: float = 0.0
    rewind: bool = False

    @classmethod
    def from_config(cls, reduction, max_epochs: int) -> PruningPlan | None:
        """The plan of ``cfg.reduction``; None when nothing is pruned. Raises ConfigError for a
        schedule that cannot fit ``max_epochs``."""
        r = reduction
        if r.get("name") not in PRUNING_REDUCTIONS:
            return None
        head_rate = float(r.get("head_rate") or 0.0)
        if not (r.depthwise_rate > 0 or r.pointwise_rate > 0 or head_rate > 0):
            return None
        return cls(
            float(r.depthwise_rate),
            float(r.pointwise_rate),
            pruning_epochs(r, max_epochs),
            head_rate,
            bool(r.get("rewind", False)),
        )

    @property
    def rounds(self) -> int:
        return len(self.epochs)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make ``model`` prunable as planned: its adapter weights count their non-zeros
        (``model.pruned``, read by accounting) and its head can lose columns."""
        model.pruned = True
        if self.head_rate > 0:
            make_head_prunable(model)
        return model

    def apply(self, model: nn.Module) -> nn.Module:
        """Prune ``model`` now, every round, and make it permanent (where nothing trains)."""
        self.prepare(model)
        depthwise, pointwise = model.prune_targets()
        for modules, rate, method in (
            (depthwise, self.depthwise_rate, "ln_structured"),
            (pointwise, self.pointwise_rate, "l1_unstructured"),
        ):
            if rate <= 0:
                continue
            for m in modules:
                for _ in range(self.rounds):
                    amount = per_round_fraction(rate, self.rounds)
                    if method == "ln_structured":
                        prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)
                    else:
                        prune.l1_unstructured(m, "weight", amount=amount)
                prune.remove(m, "weight")
        if self.head_rate > 0:
            prune_head_columns(model, self.head_rate)
        return model

    def callbacks(self, model: nn.Module) -> list[L.Callback]:
        """Lightning callbacks that prune ``model`` as planned while it trains."""
        self.prepare(model)
        depthwise, pointwise = model.prune_targets()
        when = partial(is_round_epoch, at_epochs=self.epochs)
        callbacks: list[L.Callback] = []
        for modules, rate, method, extra in (
            (depthwise, self.depthwise_rate, "ln_structured", {"pruning_dim": 0, "pruning_norm": 1}),
            (pointwise, self.pointwise_rate, "l1_unstructured", {}),
        ):
            if modules and rate > 0:
                callbacks.append(
                    ModelPruning(
                        method,
                        parameters_to_prune=[(m, "weight") for m in modules],
                        amount=per_round_fraction(rate, self.rounds),
                        # per layer (round(rate * numel) zeros in each conv), as apply(); Lightning's
                        # global default rejects structured pruning outright
                        use_global_unstructured=False,
                        apply_pruning=when,
                        use_lottery_ticket_hypothesis=self.rewind,
                        verbose=1,
                        **extra,
                    )
                )
        if callbacks:
            callbacks.append(KeepPrunedZeros(depthwise + pointwise, self.epochs[0]))
        if self.head_rate > 0:
            schedule = {
                at - 1: cumulative_fraction(self.head_rate, k, self.rounds) for k, at in enumerate(self.epochs, 1)
            }
            callbacks.append(HeadColumnPruning(model, schedule))
        return callbacks

    def counted_epochs(self, history: list[dict]) -> tuple[list[dict], list[dict]]:
        """(epochs before the first round, epochs from the last round on): the best before pruning
        is reported apart; the headline counts only what pruning left."""
        before = [h for h in history if h["epoch"] < self.epochs[0]]
        after = [h for h in history if h["epoch"] >= self.epochs[-1]] or history
        return before, after


class KeepPrunedZeros(L.Callback):
    """Re-mask pruned weights when a run resumes after its pruning epoch.

    ModelPruning stores checkpoints with the masks folded in (zeros, no mask),
    so without this the zeros of a resumed run could grow back.
    """

    def __init__(self, modules: list[nn.Module], at_epoch: int):
        self.modules = modules
        self.at_epoch = at_epoch

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.at_epoch:
            return
        for m in self.modules:
            if not prune.is_pruned(m):
                prune.custom_from_mask(m, "weight", mask=m.weight.detach() != 0)


# --------------------------------------------------------------------------- the new classifier's input columns


# A pruned column drops one input feature from the classifier. A binary classifier cannot
# express that with zero weights (sign(0) = +1 in BinaryNet), so the mask lives in a buffer
# (ColumnPrunedLinear.kept_columns) and is applied after binarisation; for an fp32 head the
# result is the same as zeroing the column. Columns with the smallest L1 norm go first.


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
