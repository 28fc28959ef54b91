"""Precise BN: BatchNorm statistics re-estimated with the final weights (``base.precise_bn``, ``base.bn=recalibrate``).

During training each BN's running mean and variance are a momentum average
(0.1) over the networks the weights passed through; in a BNN sign flips change
the activations abruptly from step to step, so the stored statistics describe
none of them and eval-mode accuracy swings from epoch to epoch.
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
where it is shorter (pycls stops after one pass: on the demo's base, two
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
from lightning.fabric.utilities.apply_func import move_data_to_device
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


def trained_norms(model: nn.Module) -> list[BatchNorm]:
    """The BNs whose running statistics ``model`` updates while it trains: those its own ``train()``
    leaves in train mode (an adapted model keeps a frozen base in eval mode: ``base.bn=frozen``)."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        return [m for m in batch_norms(model) if m.training]
    finally:
        for m, mode in modes.items():
            m.training = mode


def bn_statistics(model: nn.Module, norms: list[BatchNorm] | None = None) -> dict[str, torch.Tensor]:
    """A copy of the running statistics of ``norms`` (default: every BN), by buffer name (for
    ``torch.func.functional_call``)."""
    norms = {id(m) for m in (batch_norms(model) if norms is None else norms)}
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
def precise_bn(
    model: nn.Module, batches: Iterable, num_batches: int | None = None, norms: list[BatchNorm] | None = None
) -> int:
    """Recompute the running mean and variance of ``model``'s BNs (``norms``; default: every one)
    over ``batches`` (images, or ``(images, labels)``; the first ``num_batches``); returns how many
    batches it used.

    Each of them runs in train mode with ``momentum=None`` (a cumulative average over the batches,
    as detectron2's ``PreciseBN``); every other module stays in eval mode, no gradient is computed,
    and the modules' modes and momenta are restored afterwards. Nothing but their buffers changes.
    """
    norms = batch_norms(model) if norms is None else norms
    stream = iter(batches if num_batches is None else itertools.islice(batches, num_batches))
    first = next(stream, None)
    if first is None:
        raise ValueError("precise_bn got no batches to estimate BN statistics from")
    if not norms:
        return 0
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    before = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for batch in itertools.chain([first], stream):
            model(move_data_to_device(_images(batch), device))  # images, or a tap cache's features
            used += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, buffers in before.items():
            if not used or int(m.num_batches_tracked) == 0:  # a BN the forward does not reach keeps its statistics
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), buffers, strict=True):
                    buffer.copy_(value)
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


def at_epoch(loader, epoch: int):
    """``loader`` with its shuffle at ``epoch`` (where Lightning sets it before each epoch)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            break
    return loader


def recalibrate(
    model: nn.Module,
    datamodule,
    num_batches: int,
    device: torch.device,
    norms: list[BatchNorm] | None = None,
    epoch: int = 0,
) -> int:
    """``model``'s BN statistics (``norms``; default: every BN) re-estimated on ``datamodule``'s
    training data (its training transforms, its shuffle at ``epoch``) on ``device``:
    ``base.bn=recalibrate`` (AdaBN) passes the frozen base, before adaptation keeps them frozen; a
    run resumed after training, its last epoch, to get what its fit's :class:`PreciseBN` got."""
    datamodule.setup("fit")
    home = next(model.parameters()).device
    model.to(device)
    with _own_random_stream(device):
        used = precise_bn(model, rounds(at_epoch(datamodule.train_dataloader(), epoch)), num_batches, norms)
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

    ``only_trained``: only the BNs the fit trains (:func:`trained_norms`; an adaptation leaves a
    frozen base's statistics as they are), else every BN (pretraining).
    """

    def __init__(self, batches: int = 100, every_epoch: bool = False, only_trained: bool = False):
        self.batches, self.every_epoch, self.only_trained = batches, every_epoch, only_trained
        self.final: dict[str, torch.Tensor] | None = None  # the last epoch's re-estimated statistics
        self._restore: dict[str, torch.Tensor] | None = None
        self._side: tuple[str, dict[str, torch.Tensor]] | None = None  # (key, statistics) measured beside
        self._accuracy: MulticlassAccuracy | None = None

    def norms(self, model: nn.Module) -> list[BatchNorm]:
        return trained_norms(model) if self.only_trained else batch_norms(model)

    def re_estimate(self, trainer: L.Trainer, model: nn.Module) -> int:
        """:func:`precise_bn` of ``model`` over this fit's training batches, on the trainer's device."""
        batches = (trainer.strategy.batch_to_device(batch) for batch in rounds(trainer.train_dataloader))
        with _own_random_stream(trainer.strategy.root_device):
            return precise_bn(model, batches, self.batches, self.norms(model))

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs

    def on_validation_start(self, trainer, pl_module):
        self._side = None
        last = self._last_epoch(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit" or not (self.every_epoch or last):
            return
        norms = self.norms(pl_module)
        averaged = bn_statistics(pl_module, norms)
        self.re_estimate(trainer, pl_module)
        precise = bn_statistics(pl_module, norms)
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


def final_top1(history: list[dict], every_epoch: bool) -> tuple[float | None, float | None]:
    """The last epoch's top-1 (a run's history) with the averaged and with the re-estimated statistics."""
    last = history[-1] if history else {}
    primary, side = last.get("val/acc"), last.get(AVERAGED_KEY if every_epoch else PRECISE_KEY)
    return (side, primary) if every_epoch else (primary, side)
