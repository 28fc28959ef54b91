"""Whole-epoch throughput (``make bench``): training images per second of an epoch as
``python -m bnn_adapt`` runs it, against a bare PyTorch loop doing the same work.

Each case (full finetuning, serial, UDTA, UDTA + tap cache on the STE base, generated
CIFAR-10 5-5 in the real on-disk format) trains two ways, on copies of one model:

* ``framework``: :func:`bnn_adapt.run.fit.fit`, the Lightning module and trainer of a
  run with everything it does per epoch (the datamodule's loaders, steps, logging,
  checkpointing, validation, callbacks);
* ``bare``: a plain loop over the *same* datamodule's loaders (so a faster loader speeds
  both up alike) with the same optimiser and scheduler, forward, loss, backward, step and
  latent-weight clamping, and an evaluation pass (loss and accuracy) over the eval loader.

An epoch is timed from its start to the next one's (the framework: between Lightning's
``on_train_epoch_start`` calls, the last one to ``on_train_end``), validation included;
the first epoch of each fit is warm-up. Cases run round-robin, one fit and one bare run
of ``epochs`` epochs each per round, so load changes hit both alike: only the ratio
``framework / bare`` (epoch time) is meaningful on a shared machine.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict

from bnn_adapt.nn.layers import clamp_to_unit_, latent_weights
from bnn_adapt.run import builders
from bnn_adapt.run.config import compose
from bnn_adapt.training.lean import set_memory_mode

EPOCH_CASES = (("full_finetune", False), ("serial", False), ("udta", False), ("udta", True))  # (strategy, tap cache)


@dataclass(frozen=True)
class EpochSetup:
    """The data and length of the epoch records: generated CIFAR-10, target classes 5-9."""

    width: float
    train_per_class: int
    eval_per_class: int
    batch_size: int
    epochs: int  # per fit and per bare run; the first is warm-up
    rounds: int


# CPU: a tiny width, where the framework's own cost shows (the 1.3x goal of bench_report); GPU: the thesis's width
EPOCH_SETUPS = {
    ("cpu", "full"): EpochSetup(0.1, 1000, 200, 64, 3, 3),
    ("cpu", "quick"): EpochSetup(0.1, 320, 64, 64, 3, 1),
    ("cpu", "tiny"): EpochSetup(0.1, 16, 8, 16, 2, 1),
    ("cuda", "full"): EpochSetup(1.0, 5000, 1000, 64, 3, 2),  # CIFAR-10 5-5's 25,000 training images
    ("cuda", "quick"): EpochSetup(1.0, 2000, 400, 64, 3, 1),
    ("cuda", "tiny"): EpochSetup(0.1, 16, 8, 16, 2, 1),
}


@dataclass
class EpochCase:
    strategy: str
    cache_taps: bool
    cfg: DictConfig | None = field(default=None, repr=False)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the initial model both paths copy
    datamodule: L.LightningDataModule | None = field(default=None, repr=False)
    times: dict[str, list[float]] = field(default_factory=lambda: {"framework": [], "bare": []}, repr=False)

    @property
    def label(self) -> str:
        return self.strategy + (" + tap cache" if self.cache_taps else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> tuple[float, float]:
    """(wall-clock, this process's CPU) seconds, after the device's queued work."""
    sync(device)
    return time.perf_counter(), time.process_time()


def spans(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(marks)]


class EpochClock(L.Callback):
    """Wall-clock and CPU time of each epoch: from its ``on_train_epoch_start`` to the next one's
    (the last: to ``on_train_end``), so validation, checkpointing and logging count."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(clock(self.device))

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(clock(self.device))


def epoch_config(
    setup: EpochSetup, case: EpochCase, device: torch.device, data_dir: Path, run_dir: Path, extra: Sequence[str] = ()
) -> DictConfig:
    """The run's real config (``conf/config.yaml``: its logger, checkpointing, scheduler, trainer defaults)
    on the generated data, shrunk to ``setup``; ``extra``: more overrides."""
    overrides = [
        "data=cifar5_5",
        f"adapter={case.strategy}",
        f"base.width={setup.width}",
        f"data.batch_size={setup.batch_size}",
        f"data.limit_per_class={setup.train_per_class}",
        f"data.eval_limit_per_class={setup.eval_per_class}",
        f"trainer.max_epochs={setup.epochs}",
        f"tap_cache.enabled={str(case.cache_taps).lower()}",
        "trainer=gpu" if device.type == "cuda" else "trainer=cpu",
        *extra,
    ]
    cfg = compose(overrides, output_dir=run_dir)
    with open_dict(cfg):
        cfg.paths.data_dir = str(data_dir)
    return cfg


def prepare_case(
    case: EpochCase, setup: EpochSetup, device: torch.device, data_dir: Path, run_dir: Path, extra: Sequence[str] = ()
) -> None:
    """The case's config, initial model (a random base: speed does not depend on its weights) and datamodule."""
    from bnn_adapt.training.tap_cache import TapCacheDataModule

    case.cfg = epoch_config(setup, case, device, data_dir, run_dir, extra)
    datamodule = builders.build_datamodule(case.cfg, "target")
    torch.manual_seed(0)
    case.model = builders.build_adapted(case.cfg, builders.build_base(case.cfg), datamodule.num_classes)
    if case.cache_taps:
        tap = case.cfg.tap_cache
        datamodule = TapCacheDataModule(datamodule, case.model, tap.views, tap.max_gb)
    case.datamodule = datamodule


def run_framework(
    case: EpochCase, device: torch.device, run_dir: Path
) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    """``epochs`` epochs through :func:`bnn_adapt.run.fit.fit`: the (wall, CPU) times of the epochs after the
    first, the model."""
    from bnn_adapt.run.fit import fit

    cfg = copy.deepcopy(case.cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    timer, model = EpochClock(device), copy.deepcopy(case.model)
    # the progress bar, summary and Lightning's notes written as in a run, into buffers instead of this report
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            fit(cfg, model, case.datamodule.num_classes, case.datamodule, callbacks=[timer])
        finally:
            lightning_log.setLevel(level)
    return spans(timer.marks)[1:], model


def _on_device(datamodule: L.LightningDataModule, batch, device: torch.device):
    """A batch as Lightning hands it to the step: the datamodule's transfer hooks (whatever a datamodule
    does there, such as augmenting on the device, the bare loop does too)."""
    batch = datamodule.on_before_batch_transfer(batch, 0)
    batch = datamodule.transfer_batch_to_device(batch, device, 0)
    return datamodule.on_after_batch_transfer(batch, 0)


def run_bare(case: EpochCase, device: torch.device) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    """The same epochs as a plain PyTorch loop over the same loaders: the (wall, CPU) times of the epochs after
    the first, the model."""
    cfg, datamodule = case.cfg, case.datamodule
    model = copy.deepcopy(case.model).to(device)
    set_memory_mode(model, cfg.memory)
    if cfg.trainer.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    builders.compile_model(model, cfg.trainer.get("compile", False))
    optimizer = builders.instantiate(cfg.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = builders.instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    latent = latent_weights(model)
    mixed = str(cfg.trainer.precision).startswith("16")  # Lightning's 16-mixed: fp16 autocast + a grad scaler
    scaler = torch.amp.GradScaler(device.type) if mixed else None
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=mixed)
    datamodule.setup("fit")
    train, held_out = datamodule.train_dataloader(), datamodule.val_dataloader()
    marks = []
    for epoch in range(cfg.trainer.max_epochs):
        marks.append(clock(device))
        for sampler in (train.sampler, getattr(train.batch_sampler, "sampler", None)):  # as Lightning sets it
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        model.train()
        train_loss = torch.zeros((), device=device)
        for batch in train:
            inputs, labels = _on_device(datamodule, batch, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(inputs), labels)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            clamp_to_unit_(latent)
            train_loss += loss.detach()
        model.eval()
        correct, eval_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.inference_mode(), autocast:
            for batch in held_out:
                inputs, labels = _on_device(datamodule, batch, device)
                logits = model(inputs)
                eval_loss += F.cross_entropy(logits, labels)
                correct += (logits.argmax(1) == labels).sum()
        if scheduler is not None:
            scheduler.step()
        float(train_loss), float(correct), float(eval_loss)  # what a loop reports once per epoch
    marks.append(clock(device))
    return spans(marks)[1:], model


def epoch_records(setup: EpochSetup, device: torch.device, log=print) -> list[dict]:
    """Every case of :data:`EPOCH_CASES`, timed round-robin; one record per case."""
    import bnn_adapt.__main__  # noqa: F401 - python -m bnn_adapt's warning filters, as a run has them
    from bnn_adapt.training.datasets.cifar10 import write_cifar10

    cases = [EpochCase(strategy, cached) for strategy, cached in EPOCH_CASES]
    with tempfile.TemporaryDirectory(prefix="bnn_adapt_bench_epoch_") as tmp:
        root = Path(tmp)
        write_cifar10(root / "cifar10", n_per_class=max(setup.train_per_class, setup.eval_per_class))
        for case in cases:
            prepare_case(case, setup, device, root, root / "runs" / case.label.replace(" ", "_"))
        for r in range(setup.rounds):
            for case in cases:
                log(f"  epoch round {r + 1}/{setup.rounds}: {case.label}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
                    case.times["framework"] += run_framework(case, device, root / "runs" / f"{case.label}_{r}")[0]
                case.times["bare"] += run_bare(case, device)[0]
        records = [epoch_record(case, setup) for case in cases]
    return records


def epoch_record(case: EpochCase, setup: EpochSetup) -> dict:
    datamodule = getattr(case.datamodule, "datamodule", case.datamodule)  # the images behind a tap cache
    train_images, eval_images = len(datamodule.train_set), len(datamodule.eval_set)
    wall = {k: [t[0] for t in case.times[k]] for k in case.times}
    cpu = {k: [t[1] for t in case.times[k]] for k in case.times}
    framework, bare = statistics.median(wall["framework"]), statistics.median(wall["bare"])
    framework_cpu, bare_cpu = statistics.median(cpu["framework"]), statistics.median(cpu["bare"])
    return {
        "kind": "epoch",
        "model": "ste_resnet_cifar",
        "strategy": case.strategy,
        "cache_taps": case.cache_taps,
        "width": setup.width,
        "batch_size": setup.batch_size,
        "train_images": train_images,
        "eval_images": eval_images,
        "precision": str(case.cfg.trainer.precision),
        "epoch_time_s": framework,
        "bare_epoch_time_s": bare,
        "images_per_s": train_images / framework,
        "bare_images_per_s": train_images / bare,
        "framework_vs_bare": framework / bare,
        # this process's CPU time: what other processes on a shared CPU do not inflate (the loader's worker
        # processes, if any, are not in it, for both alike)
        "epoch_cpu_s": framework_cpu,
        "bare_epoch_cpu_s": bare_cpu,
        "framework_vs_bare_cpu": framework_cpu / bare_cpu,
        "epoch_times_s": wall["framework"],
        "bare_epoch_times_s": wall["bare"],
        "epoch_cpu_times_s": cpu["framework"],
        "bare_epoch_cpu_times_s": cpu["bare"],
    }
