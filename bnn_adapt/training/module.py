"""The Lightning module: cross-entropy classification of any ``nn.Module``.

Binary latent weights are clamped to [-1, 1] after every optimiser step
(BinaryNet); the optimiser only sees parameters that require gradients.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from bnn_adapt.errors import TrainingDiverged
from bnn_adapt.nn.layers import clamp_latent_weights


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
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = self.criterion(logits, labels)
        accuracy(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # Lightning (2.2+) never calls .train() itself: a module keeps the mode
        # it was built in. Apply the model's own train(), which keeps a frozen
        # base in eval mode (base.bn=frozen: its BN running statistics must not
        # drift on the target data; AdaptedModel.train). Validation restores
        # these per-module modes after each run.
        self.model.train()

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", self.train_acc)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                f"lower optimizer.lr or check the data"
            )
        return loss

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
        clamp_latent_weights(self.model)
