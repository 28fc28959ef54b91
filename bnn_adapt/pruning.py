"""One-shot magnitude pruning of adapters (thesis chapter 6.4).

At ``epochs // 2``: structured L1 on depthwise-conv filters (whole filters,
dim 0) and unstructured L1 on the pointwise convs. Training uses Lightning's
:class:`~lightning.pytorch.callbacks.ModelPruning` (one instance per kind,
survivors are *not* rewound), which removes the masks at the end of training
and from every checkpoint it writes.
"""

from __future__ import annotations

from functools import partial

import lightning as L
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune


def mark_pruned(modules: list[nn.Module]) -> None:
    """Tell accounting that these weights count their non-zeros."""
    for m in modules:
        m.pruned_param_names = ("weight",)


def prune_now(model: nn.Module, depthwise_rate: float, pointwise_rate: float, rounds: int = 1) -> None:
    """Prune an adapted model's adapter in place and make it permanent.

    Used where no training happens (``summary_only``): gives exactly the counts
    that :func:`pruning_callbacks` (``rounds=1``) or
    :func:`iterative_pruning_callbacks` will leave.
    """
    depthwise, pointwise = model.prune_targets()
    for m in depthwise:
        if depthwise_rate > 0:
            for _ in range(rounds):
                prune.ln_structured(m, "weight", amount=per_round_fraction(depthwise_rate, rounds), n=1, dim=0)
            prune.remove(m, "weight")
    for m in pointwise:
        if pointwise_rate > 0:
            for _ in range(rounds):
                prune.l1_unstructured(m, "weight", amount=per_round_fraction(pointwise_rate, rounds))
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
    if callbacks:
        callbacks.append(KeepPrunedZeros(depthwise + pointwise, at_epoch))
    return callbacks


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


# --------------------------------------------------------------------------- iterative (lottery-ticket style)


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
    from bnn_adapt.errors import ConfigError  # noqa: PLC0415

    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
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


def iterative_pruning_callbacks(
    model: nn.Module, depthwise_rate: float, pointwise_rate: float, at_epochs: list[int], rewind: bool
) -> list[L.Callback]:
    """``len(at_epochs)`` rounds of the one-shot pruning above, reaching the rates.

    ``rewind=True`` resets the surviving weights to their values when training
    started after each round (Lightning's lottery-ticket option).
    """
    depthwise, pointwise = model.prune_targets()
    mark_pruned(depthwise + pointwise)
    rounds = len(at_epochs)
    when = partial(is_round_epoch, at_epochs=tuple(at_epochs))
    callbacks: list[L.Callback] = []
    for modules, rate, method, extra in (
        (depthwise, depthwise_rate, "ln_structured", {"pruning_dim": 0, "pruning_norm": 1}),
        (pointwise, pointwise_rate, "l1_unstructured", {}),
    ):
        if modules and rate > 0:
            callbacks.append(
                ModelPruning(
                    method,
                    parameters_to_prune=[(m, "weight") for m in modules],
                    amount=per_round_fraction(rate, rounds),
                    use_global_unstructured=False,
                    apply_pruning=when,
                    use_lottery_ticket_hypothesis=rewind,
                    verbose=1,
                    **extra,
                )
            )
    if callbacks:
        callbacks.append(KeepPrunedZeros(depthwise + pointwise, at_epochs[0]))
    return callbacks


def is_round_epoch(epoch: int, at_epochs: tuple[int, ...]) -> bool:
    return epoch + 1 in at_epochs
