"""Precise BN: BatchNorm statistics re-estimated with the final weights (``base.precise_bn``, ``base.bn=recalibrate``).

During training each BN's running mean and variance are a momentum average
(0.1) over the networks the weights passed through; in a BNN sign flips change
the activations abruptly from step to step, so the stored statistics describe
none of them and eval-mode accuracy swings from epoch to epoch (issue #22).
Vision frameworks recompute them once the weights are final, "precise BN"
(pycls ``compute_precise_bn_stats``; detectron2's ``PreciseBN`` hook, fvcore
``update_bn_stats``): a forward pass over some training batches without
gradient, each BN in train mode with ``momentum=None``, so its running
statistics become the plain average of the batch statistics. AdaBN (Li et al.
2016, "Revisiting Batch Normalization For Practical Domain Adaptation") does
the same for a frozen network on the *target* domain's data:
:func:`recalibrate`.

:func:`precise_bn` works on any ``nn.Module`` without Lightning. The
:class:`PreciseBN` callback and :func:`recalibrate` feed it ``batches``
training batches with the training transforms, going round the loader again
where it is shorter (pycls stops after one pass: on the digits base, two
one-pass estimates of 11 batches differed by 2.6 points of top-1), drawn from
a fixed seed of their own: the statistics are a function of the weights, and
the run's random stream is left as it was.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

import lightning as L
import torch
from torch import nn
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

BatchNorm = nn.modules.batchnorm._BatchNorm
#: per-epoch keys beside ``val/acc``: the accuracy with the statistics that epoch's validation did not use
PRECISE_KEY = "val/acc_precise_bn"
AVERAGED_KEY = "val/acc_averaged_bn"
SEED = 0  # of the augmentations and order a pass draws


def batch_norms(model: nn.Module) -> list[BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BN's running statistics, by buffer name (for ``torch.func.functional_call``)."""
    norms = {id(m) for m in batch_norms(model)}
    owners = dict(model.named_modules())
    return {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers()
        if id(owners[name.rpartition(".")[0]]) in norms
    }


@torch.no_grad()
def load_bn_statistics(model: nn.Module, statistics: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    for name, value in statistics.items():
        buffers[name].copy_(value)


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> int:
    """Recompute every BN's running mean and variance of ``model`` over ``batches`` (images, or
    ``(images, labels)``; the first ``num_batches``); returns how many batches it used.

    Each BN runs in train mode with ``momentum=None`` (a cumulative average over the batches, as
    detectron2's ``PreciseBN``); every other module stays in eval mode, no gradient is computed,
    and the modules' modes and momenta are restored afterwards. Nothing but BN buffers changes.
    """
    norms = batch_norms(model)
    stream = iter(batches if num_batches is None else itertools.islice(batches, num_batches))
    first = next(stream, None)
    if first is None:
        raise ValueError("precise_bn got no batches to estimate BN statistics from")
    if not norms:
        return 0
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for batch in itertools.chain([first], stream):
            model(_images(batch).to(device, non_blocking=True))
            used += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
    return used


@torch.no_grad()
def top1(model: nn.Module, batches: Iterable) -> float:
    """Eval-mode top-1 of ``model`` over ``(images, labels)`` batches (already on its device)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    accuracy = None
    try:
        for images, labels in batches:
            logits = model(images)
            accuracy = accuracy or MulticlassAccuracy(logits.shape[1], average="micro").to(logits.device)
            accuracy.update(logits, labels)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if accuracy is None:
        raise ValueError("top1 got no batches to evaluate")
    return float(accuracy.compute())


@contextlib.contextmanager
def _own_random_stream(device: torch.device):
    """The pass draws its augmentations from ``SEED``; the run's random stream is restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        yield


def rounds(loader: Iterable) -> Iterator:
    """The loader's batches, round again and again (new augmentations each time)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def recalibrate(model: nn.Module, datamodule, num_batches: int, device: torch.device) -> int:
    """``model``'s BN statistics re-estimated on ``datamodule``'s training data (its training
    transforms) on ``device``: ``base.bn=recalibrate`` (AdaBN) passes the frozen base, before
    adaptation keeps them frozen."""
    datamodule.setup("fit")
    home = next(model.parameters()).device
    model.to(device)
    with _own_random_stream(device):
        used = precise_bn(model, rounds(datamodule.train_dataloader()), num_batches)
    model.to(home)
    return used


class PreciseBN(L.Callback):
    """Precise BN in a Lightning fit: before the last validation (``every_epoch``: before every one).

    The last validation measures both statistics: ``val/acc`` with the averaged ones and
    ``val/acc_precise_bn`` beside it (``every_epoch``: ``val/acc`` with the re-estimated ones,
    ``val/acc_averaged_bn`` beside it at the last epoch), the other one through
    ``torch.func.functional_call``. The averaged statistics are put back after each validation,
    so training (and a resumed run) proceeds as without this callback; when training ends the
    network keeps the re-estimated ones, ready to be saved.
    """

    def __init__(self, batches: int = 100, every_epoch: bool = False):
        self.batches, self.every_epoch = batches, every_epoch
        self.final: dict[str, torch.Tensor] | None = None  # the last epoch's re-estimated statistics
        self._restore: dict[str, torch.Tensor] | None = None
        self._side: tuple[str, dict[str, torch.Tensor]] | None = None  # (key, statistics) measured beside
        self._accuracy: MulticlassAccuracy | None = None

    def re_estimate(self, trainer: L.Trainer, model: nn.Module) -> int:
        """:func:`precise_bn` of ``model`` over this fit's training batches, on the trainer's device."""
        batches = (trainer.strategy.batch_to_device(batch) for batch in rounds(trainer.train_dataloader))
        with _own_random_stream(trainer.strategy.root_device):
            return precise_bn(model, batches, self.batches)

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs

    def on_validation_start(self, trainer, pl_module):
        self._side = None
        last = self._last_epoch(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit" or not (self.every_epoch or last):
            return
        averaged = bn_statistics(pl_module)
        self.re_estimate(trainer, pl_module)
        precise = bn_statistics(pl_module)
        if last:
            self.final = precise
        if self.every_epoch:
            self._restore = averaged
            self._side = (AVERAGED_KEY, averaged) if last else None
        else:
            load_bn_statistics(pl_module, averaged)
            self._side = (PRECISE_KEY, precise)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._side is None:
            return
        images, labels = batch
        logits = functional_call(pl_module, self._side[1], (images,))
        if self._accuracy is None:
            self._accuracy = MulticlassAccuracy(logits.shape[1], average="micro")
        self._accuracy.to(logits.device).update(logits, labels)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._side is not None and self._accuracy is not None:
            pl_module.log(self._side[0], self._accuracy.compute(), on_step=False, on_epoch=True)
            self._accuracy.reset()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._restore is not None:
            load_bn_statistics(pl_module, self._restore)
            self._restore = None

    def on_train_end(self, trainer, pl_module):
        if self.final is None:  # stopped before max_epochs: the network still leaves with real statistics
            self.re_estimate(trainer, pl_module)
        else:
            load_bn_statistics(pl_module, self.final)


def final_top1(history: list[dict], every_epoch: bool, evaluated: str = "test") -> dict:
    """``metrics.json``'s last-epoch top-1 with the averaged and with the re-estimated statistics
    (``evaluated``: ``test``, or ``val`` where every epoch is evaluated on a validation split)."""
    last = history[-1] if history else {}
    primary, side = last.get("val/acc"), last.get(AVERAGED_KEY if every_epoch else PRECISE_KEY)
    averaged, precise = (side, primary) if every_epoch else (primary, side)
    return {f"{evaluated}_top1_averaged_bn": averaged, f"{evaluated}_top1_precise_bn": precise}
