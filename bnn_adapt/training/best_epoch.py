"""Pretraining keeps the base of its best-test-accuracy epoch beside its last one.

The thesis adapted the epoch of its base that scored best on the test set
(docs/thesis.md: its protocol), so a pretraining run writes that epoch too, to
:func:`~bnn_adapt.bases.checkpoint.best_epoch_path` of ``base.save_to``;
``base.epoch=best`` makes adaptation read it. With ``data.val_fraction > 0`` the
per-epoch evaluation, and so the best epoch, is on the validation split instead.
With precise BN (:mod:`bnn_adapt.training.precise_bn`) that epoch's BN statistics
are re-estimated for its own weights when training ends, as the last epoch's are.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L

from bnn_adapt.bases.checkpoint import save_base
from bnn_adapt.errors import CheckpointError
from bnn_adapt.files import load_weights
from bnn_adapt.training.precise_bn import PreciseBN, top1


class KeepBestEpoch(L.Callback):
    """After each validation, store the trained network when ``monitor`` beat every earlier epoch.

    The first of equal best epochs is kept (a strict improvement, as the thesis's
    ``if acc > best: save``). Written from rank 0, so it works under ``ddp_spawn``
    too; its state rides in Lightning's checkpoint, so ``resume=true`` carries on.
    ``precise``: the run's :class:`PreciseBN`; unless it re-estimates before every
    validation, the stored epoch gets its statistics re-estimated when training ends
    (its file's ``top1`` stays the accuracy it was chosen by; ``top1_precise_bn`` is
    the accuracy with the re-estimated statistics).
    """

    def __init__(
        self, path: str | Path, meta: dict | None = None, monitor: str = "val/acc", precise: PreciseBN | None = None
    ):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.monitor = monitor
        self.precise = precise
        self.best: float | None = None
        self.epoch: int | None = None
        self.top1_precise_bn: float | None = None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.epoch = value, trainer.current_epoch
            if trainer.is_global_zero:
                save_base(pl_module.model, self.path, **self.meta, top1=value, epoch=trainer.current_epoch)

    def on_train_end(self, trainer, pl_module):
        if self.precise is None or self.epoch is None:
            return
        if self.precise.every_epoch:  # it was chosen, and stored, with re-estimated statistics
            self.top1_precise_bn = self.best
            return
        if not trainer.is_global_zero:
            return
        stored = load_weights(self.path, "best epoch's base", "pretrain the base again", error=CheckpointError)
        model = copy.deepcopy(pl_module.model)
        model.load_state_dict(stored["state_dict"])
        self.precise.re_estimate(trainer, model)
        if trainer.world_size == 1:  # under DDP rank 0 sees only its share of the eval set
            self.top1_precise_bn = top1(model, (trainer.strategy.batch_to_device(b) for b in trainer.val_dataloaders))
        save_base(
            model,
            self.path,
            **self.meta,
            top1=stored["top1"],
            epoch=stored["epoch"],
            top1_precise_bn=self.top1_precise_bn,
        )

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epoch = state["best"], state["epoch"]
