"""Pretraining keeps the base of its best-test-accuracy epoch beside its last one.

The thesis adapted the epoch of its base that scored best on the test set
(SPEC 6: its protocol), so a pretraining run writes that epoch too, to
:func:`~bnn_adapt.bases.checkpoint.best_epoch_path` of ``base.save_to``;
``base.epoch=best`` makes adaptation read it. With ``data.val_fraction > 0`` the
per-epoch evaluation, and so the best epoch, is on the validation split instead.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from bnn_adapt.bases.checkpoint import save_base


class KeepBestEpoch(L.Callback):
    """After each validation, store the trained network when ``monitor`` beat every earlier epoch.

    The first of equal best epochs is kept (a strict improvement, as the thesis's
    ``if acc > best: save``). Written from rank 0, so it works under ``ddp_spawn``
    too; its state rides in Lightning's checkpoint, so ``resume=true`` carries on.
    """

    def __init__(self, path: str | Path, meta: dict | None = None, monitor: str = "val/acc"):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.monitor = monitor
        self.best: float | None = None
        self.epoch: int | None = None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.epoch = value, trainer.current_epoch
            if trainer.is_global_zero:
                save_base(pl_module.model, self.path, **self.meta, top1=value, epoch=trainer.current_epoch)

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epoch = state["best"], state["epoch"]
