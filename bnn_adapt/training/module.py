"""The Lightning module: cross-entropy classification of any ``nn.Module``.

Binary latent weights are clamped to [-1, 1] after every optimiser step
(BinaryNet); the optimiser only sees parameters that require gradients.

The training step is kept lean (docs/speed.md): nothing in it waits for the device.
Its losses are collected on the device and checked for divergence (and summed
into the epoch's mean loss) every ``trainer.log_every_n_steps`` steps and at the
last step of the epoch; the step loss is logged only on the steps Lightning
writes to its loggers; the latent weights to clamp are listed once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from bnn_adapt.errors import TrainingDiverged
from bnn_adapt.nn.layers import clamp_to_unit_, latent_weights


def _accuracy(num_classes: int) -> MulticlassAccuracy:
    # validate_args=False: torchmetrics would check the labels' values on every update, which waits for
    # the device (torch.unique); the datamodules give labels 0..C-1
    return MulticlassAccuracy(num_classes, average="micro", validate_args=False)


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = _accuracy(num_classes)
        self.val_acc = _accuracy(num_classes)
        self.test_acc = _accuracy(num_classes)
        # the epoch's mean training loss, weighted by batch size; updated once per check (check_losses), which
        # lets no NaN through. (Not nan_strategy="disable": torchmetrics 1.9 then drops the weights.)
        self.train_loss = MeanMetric()
        self.latent: list[nn.Parameter] = []  # what optimizer_step clamps (on_train_epoch_start)
        self.unchecked: list[tuple[int, torch.Tensor, int]] = []  # (step, loss, batch size) not yet checked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = self.criterion(logits, labels)
        accuracy.update(logits, labels)
        if stage != "train":
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # Lightning (2.2+) never calls .train() itself: a module keeps the mode
        # it was built in. Apply the model's own train(), which keeps a frozen
        # base in eval mode (base.bn=frozen: its BN running statistics must not
        # drift on the target data; AdaptedModel.train). Validation restores
        # these per-module modes after each run.
        self.model.train()
        # listed again each epoch: pruning, a callback that (un)freezes layers or a lean mode
        # switch between epochs may change the set
        self.latent = latent_weights(self.model)

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", self.train_acc)
        self.unchecked.append((self.global_step, loss.detach(), len(batch[1])))
        trainer = self.trainer
        logging_step = trainer._logger_connector.should_update_logs  # the steps Lightning writes to its loggers
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if logging_step or last:
            self.check_losses()
        if logging_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        if logging_step or last or batch_idx == 0:
            # metric objects: logged once in an epoch, Lightning computes and resets them at its end
            self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def check_losses(self) -> None:
        """Raise :class:`TrainingDiverged` naming the first non-finite loss since the last check (one
        wait for the device), else add the losses to the epoch's mean."""
        if not self.unchecked:
            return
        steps, losses, sizes = zip(*self.unchecked, strict=True)
        self.unchecked = []
        losses = torch.stack(losses)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise TrainingDiverged(
                f"training loss became {losses[first].item()} at epoch {self.current_epoch}, step {steps[first]}; "
                f"lower optimizer.lr or check the data"
            )
        self.train_loss.update(losses, torch.tensor(sizes, dtype=losses.dtype).to(losses.device, non_blocking=True))

    def on_train_epoch_end(self) -> None:
        self.check_losses()  # a loader without a known length: whatever its last steps left

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        clamp_to_unit_(self.latent)
