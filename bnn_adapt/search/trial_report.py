"""A search trial's epochs, reported to its Optuna trial; with a pruner, hopeless trials stop early.

Each epoch's validation top-1 (``val/acc``) becomes an intermediate value of the job's trial
(``optuna-dashboard`` plots them). With ``search.pruner`` (an Optuna pruner, ``conf/search/pruner/``)
the trial is then judged: Optuna's pruners judge single-objective studies only
(``Trial.should_prune`` refuses a study with several directions), and a trial's size is known before
it trains, so the pruner judges it among the trials no larger than it (:func:`should_prune`): a trial
that those beat at the same epoch cannot reach the Pareto front. It is judged only once its weights
are pruned as they will end (after the last round of ``reduction=prune``, at ``reduction.at_epoch``):
the top-1 before one-shot weight pruning does not tell the top-1 after it (one Fashion-MNIST
trial fell from 0.728 to 0.316 when 95 % of its weights were pruned); a trial whose rates are all 0 prunes no
weight and is judged from its first epoch. A pruned trial stops after that epoch; its
``metrics.json`` says ``"status": "pruned"``, and its trial records the epoch
(``bnn_adapt:pruned_after_epoch``). hydra-optuna-sweeper tells Optuna only COMPLETE or FAIL, so the
study holds a pruned trial as FAIL with that attribute.
"""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig
from optuna import create_study
from optuna.pruners import BasePruner
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from bnn_adapt.run.builders import instantiate
from bnn_adapt.search import study
from bnn_adapt.search.study import PRUNED_ATTR, SIZE_ATTR
from bnn_adapt.training.pruning import PruningPlan

METRIC = "val/acc"


def size_of(trial: FrozenTrial, size_index: int) -> float | None:
    if SIZE_ATTR in trial.system_attrs:
        return float(trial.system_attrs[SIZE_ATTR])
    return trial.values[size_index] if trial.state == TrialState.COMPLETE and trial.values else None


def _as_single_objective(trial: FrozenTrial, accuracy_index: int, state: TrialState) -> FrozenTrial:
    value = trial.values[accuracy_index] if state == TrialState.COMPLETE else None
    return create_trial(
        state=state,
        value=value,
        intermediate_values=dict(trial.intermediate_values),
        system_attrs=dict(trial.system_attrs),
    )


def should_prune(
    pruner: BasePruner,
    storage: BaseStorage,
    study_id: int,
    trial_id: int,
    size_pct: float,
    accuracy_index: int = 0,
    size_index: int = 1,
) -> bool:
    """Optuna's ``pruner`` on a single-objective view of the study (maximise validation top-1) that
    holds this trial and the trials no larger than it; what the pruner records (successive halving's
    rungs) is written back to the trial."""
    me = storage.get_trial(trial_id)
    view = create_study(direction="maximize", pruner=pruner)  # in memory
    for other in storage.get_all_trials(study_id, deepcopy=False):
        size = size_of(other, size_index)
        if other._trial_id == trial_id or size is None or size > size_pct or not other.intermediate_values:
            continue
        if other.state == TrialState.FAIL:  # a failed trial says nothing; a pruned one (FAIL here) does
            state = TrialState.PRUNED if PRUNED_ATTR in other.system_attrs else None
        else:
            state = other.state if other.state in (TrialState.COMPLETE, TrialState.RUNNING) else None
        if state is not None:
            view.add_trial(_as_single_objective(other, accuracy_index, state))
    view.add_trial(_as_single_objective(me, accuracy_index, TrialState.RUNNING))
    judged = view.trials[-1]
    pruned = pruner.prune(view, judged)
    recorded = view._storage.get_trial(judged._trial_id).system_attrs
    for key, value in recorded.items():
        if me.system_attrs.get(key) != value:
            storage.set_trial_system_attr(trial_id, key, value)
    return pruned


class TrialReport(L.Callback):
    """Reports each epoch's validation top-1 to the job's Optuna trial and, with a pruner, stops a
    trial that cannot reach the front (see the module's docstring)."""

    def __init__(self, cfg: DictConfig, size_pct: float):
        self.cfg = cfg  # the storage is opened where the callback runs (a spawned rank opens its own)
        self.size_pct = float(size_pct)
        self.pruner = instantiate(cfg.search.pruner) if cfg.search.get("pruner") else None
        names = list(cfg.get("optimized_metrics") or ["test_top1", "size_pct"])
        self.size_index = names.index("size_pct") if "size_pct" in names else 1
        self.accuracy_index = 1 - self.size_index if len(names) == 2 else 0
        # the first epoch whose top-1 is of the weights as they end (weight pruning at the end of epoch ``at``;
        # a trial whose rates prune nothing is judged from its first epoch)
        plan = PruningPlan.from_config(cfg.reduction, cfg.trainer.max_epochs)
        self.first_judged_epoch = max(plan.epochs) + 1 if plan is not None else 1
        self.pruned_after_epoch: int | None = None
        self._ids: tuple[BaseStorage, int, int] | None = None

    @classmethod
    def for_run(cls, cfg: DictConfig, counts) -> TrialReport | None:
        """The callback for an adaptation job of a search (``counts()``: the run's counts), else None."""
        if study.trial_number(cfg) is None or cfg.task != "adapt":
            return None
        return cls(cfg, counts().size_pct)

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._ids = study.trial_ids(self.cfg)
            storage, _, trial_id = self._ids
            storage.set_trial_system_attr(trial_id, SIZE_ATTR, self.size_pct)

    def on_train_epoch_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(METRIC)
        epoch = trainer.current_epoch + 1  # epochs trained: Optuna's step
        prune = False
        if trainer.is_global_zero and value is not None and self._ids is not None:
            storage, study_id, trial_id = self._ids
            storage.set_trial_intermediate_value(trial_id, epoch, float(value))
            if self.pruner is not None and self.first_judged_epoch <= epoch < trainer.max_epochs:
                prune = should_prune(
                    self.pruner, storage, study_id, trial_id, self.size_pct, self.accuracy_index, self.size_index
                )
            if prune:
                storage.set_trial_system_attr(trial_id, PRUNED_ATTR, epoch)
                print(
                    f"trial {study.trial_number(self.cfg)} pruned after epoch {epoch} "
                    f"({METRIC} {float(value):.4f}, size {self.size_pct:.3f}% of the base)"
                )
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True
            self.pruned_after_epoch = epoch
