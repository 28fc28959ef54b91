"""The one task function: instantiate from config, train, write results.

``run(cfg)`` handles ``task=pretrain`` (train a base on the base classes and
save it to ``base.save_to``), ``task=adapt`` (attach the configured adapter to
the frozen base from ``base.checkpoint``, train it on the target classes and
write its adapter file) and ``summary_only=true`` (build the model, count, no
data: :mod:`bnn_adapt.run.counts`). It returns the metrics dict, which Hydra
sweepers (Optuna included) read. ``task=export`` (bit-packed base + adapter
files) and ``task=predict`` (one base, many adapters) are deployment steps:
:mod:`bnn_adapt.deploy`; ``task=evaluate`` (a base, or base + adapter, on its
test split) is :mod:`bnn_adapt.run.evaluate`.

Beside it: the fit (:mod:`bnn_adapt.run.fit`), whether a run runs at all
(:mod:`bnn_adapt.run.rerun`), and what follows training, named steps that never
lose the measured numbers (:mod:`bnn_adapt.run.records`); ``resume=true`` redoes
a failed one from the run's last checkpoint, without training again
(:func:`resume_after_training`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from bnn_adapt import accounting
from bnn_adapt.adapters.file import ADAPTER_FILE, export_adapter
from bnn_adapt.bases import save_base
from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.errors import ConfigError
from bnn_adapt.run import builders, claims, preflight, ranks, resume, tracking
from bnn_adapt.run.config import validate, without_hydra_node
from bnn_adapt.run.counts import base_counts, run_summary
from bnn_adapt.run.fit import fit, precise_bn_callback, with_precise_top1
from bnn_adapt.run.provenance import torch_threads
from bnn_adapt.run.record import COMPLETE, PRUNED, RunRecord, completed
from bnn_adapt.run.records import (
    ADAPTER_FILE_STEP,
    BASE_FILE_STEP,
    FailedAfterTraining,
    adapted_base_sha256,
    after_training,
    record_failure,
)
from bnn_adapt.run.rerun import choose_run_dir, failed_after_training, skip_or_rerun
from bnn_adapt.run.results import config_hash
from bnn_adapt.training import tap_cache
from bnn_adapt.training.best_epoch import KeepBestEpoch
from bnn_adapt.training.precise_bn import PreciseBN, recalibrate


def run_pretrain(cfg: DictConfig) -> RunRecord:
    datamodule = builders.build_datamodule(cfg, "base")
    base = builders.build_base(cfg)
    if base.num_classes != datamodule.num_classes:
        raise ConfigError(f"base has {base.num_classes} classes but data.base_classes lists {datamodule.num_classes}")
    meta = {
        "base_classes": datamodule.class_names,
        "image_size": cfg.data.image_size,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    precise = precise_bn_callback(cfg, base)
    best = KeepBestEpoch(best_epoch_path(cfg.base.save_to), meta, precise=precise)  # the thesis adapted it
    result, fit_error = fit(
        cfg, base, datamodule.num_classes, datamodule, callbacks=[best, *([precise] if precise else [])]
    )
    if precise is not None:
        with_precise_top1(result, precise, datamodule)
        result.best_epoch_top1_precise_bn = best.top1_precise_bn
    counts = base_counts(base, cfg.data.image_size).to_dict()
    measured = dataclasses.replace(result, **counts, base_checkpoint=str(cfg.base.save_to))
    measured.best_epoch_checkpoint, measured.best_epoch = str(best.path), best.epoch
    return after_training(cfg, measured, pretrain_steps(cfg, base, meta, measured), fit_error)


def pretrain_steps(cfg: DictConfig, base, meta: dict, measured: RunRecord) -> list[tuple[str, Any]]:
    """What follows pretraining: the base's last epoch at ``base.save_to`` (its best is written while it trains)."""
    top1, epoch = measured.test_top1, (measured.epochs_run or 0) - 1
    return [(BASE_FILE_STEP, lambda: save_base(base, cfg.base.save_to, **meta, top1=top1, epoch=epoch))]


def run_adapt(cfg: DictConfig) -> RunRecord:
    datamodule = builders.build_datamodule(cfg, "target")
    # build on a fresh base first: config errors (and a pruning schedule that cannot fit) surface before training
    builders.build_adapted(cfg, builders.build_base(cfg), datamodule.num_classes)
    preflight.check_base(cfg)  # a missing base: one line naming the command that makes it
    if preflight.pretrains_missing_base(cfg):  # its default place only; one run pretrains it, others wait
        if ranks.launched_world_size() > 1:  # rank 0 would pretrain under a claim the other ranks wait for
            raise ConfigError(
                f"no base checkpoint at {cfg.base.checkpoint}: with one process per device "
                "(trainer=ddp_slurm) pretrain it first, in a run of its own"
            )
        with claims.file_claim(cfg.base.checkpoint, f"base checkpoint {cfg.base.checkpoint}"):
            if not Path(cfg.base.checkpoint).is_file():
                sub = builders.pretraining_config(cfg)
                print(
                    f"no base checkpoint at {cfg.base.checkpoint}: pretraining it first "
                    f"({sub.trainer.max_epochs} epochs)"
                )
                L.seed_everything(sub.seed, workers=True, verbose=False)  # the base a pretraining run would train
                run_pretrain(sub)
    # the same adaptation whether or not this run pretrained its base (and whatever the check above drew)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    base = builders.load_trained_base(cfg)
    model = builders.build_adapted(cfg, base, datamodule.num_classes)
    plan = builders.pruning_plan(cfg)
    before_fit = None
    if cfg.base.bn == "recalibrate":  # AdaBN, before a tap cache reads the base
        batches = OmegaConf.select(cfg, "base.precise_bn.batches", default=PreciseBN().batches)
        before_fit = functools.partial(recalibrate, model.base, datamodule, batches)
    training_data = adaptation_data(cfg, model, datamodule)
    precise = precise_bn_callback(cfg, model)
    result, fit_error = fit(
        cfg,
        model,
        datamodule.num_classes,
        training_data,
        plan,
        callbacks=[precise] if precise else [],
        before_fit=before_fit,
    )
    if precise is not None:
        with_precise_top1(result, precise, datamodule)
    counts = accounting.summarize(model, cfg.data.image_size)
    measured = dataclasses.replace(
        result, **counts, class_names=datamodule.class_names, base_origin=getattr(base, "origin", None)
    )
    return after_training(cfg, measured, adapt_steps(cfg, model, datamodule), fit_error)


def adaptation_data(cfg: DictConfig, model, datamodule):
    """What the adaptation trains on: ``datamodule``, or the tap cache of ``model``'s frozen base over it."""
    if cfg.tap_cache.enabled:
        return tap_cache.TapCacheDataModule(datamodule, model, cfg.tap_cache.views, cfg.tap_cache.max_gb)
    if cfg.tap_cache.views > 1:
        print(
            f"note: tap_cache.views={cfg.tap_cache.views} has no effect without tap_cache.enabled=true", file=sys.stderr
        )
    return datamodule


def adapt_steps(cfg: DictConfig, model, datamodule) -> list[tuple[str, Any]]:
    """What follows adaptation: the run's adapter file (the trained adapter and head)."""

    def write_adapter_file() -> None:
        export_adapter(
            model,
            Path(cfg.paths.output_dir) / ADAPTER_FILE,
            reference_base=builders.load_trained_base(cfg),
            class_names=datamodule.class_names,
            preprocess=builders.preprocessing(datamodule),
            source={"run_dir": str(cfg.paths.output_dir), "config_hash": config_hash(cfg)},
        )

    return [(ADAPTER_FILE_STEP, write_adapter_file)]


def resume_after_training(cfg: DictConfig, earlier: RunRecord) -> RunRecord:
    """``resume=true`` on a run that failed after training: the model from its last checkpoint, then
    the step that failed and those after it (a failed end of fitting is not called again: its trackers
    only mirror what metrics.json holds); the numbers are the ones measured when it trained."""
    out = Path(cfg.paths.output_dir)
    step = earlier.failed_step
    print(f"resuming {out} after training: redoing {step!r} from {out / resume.CHECKPOINT}, no training")
    measured = dataclasses.replace(earlier, status=COMPLETE, failed_step=None, error=None)
    last_epoch = max((measured.epochs_run or 1) - 1, 0)
    if cfg.task == "pretrain":
        datamodule = builders.build_datamodule(cfg, "base")
        base = resume.load_trained_weights(builders.build_base(cfg), out)
        precise = precise_bn_callback(cfg, base)
        if precise is not None:  # the checkpoint holds the averaged statistics: re-estimate, as the fit did
            recalibrate(base, datamodule, precise.batches, torch.device("cpu"), epoch=last_epoch)
        meta = {
            "base_classes": datamodule.class_names,
            "image_size": cfg.data.image_size,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        steps = pretrain_steps(cfg, base, meta, measured)
    else:
        datamodule = builders.build_datamodule(cfg, "target")
        model = builders.build_adapted(cfg, builders.load_trained_base(cfg), datamodule.num_classes)
        model = resume.load_trained_weights(model, out)
        precise = precise_bn_callback(cfg, model)
        if precise is not None:  # as the fit did: the checkpoint holds the averaged statistics
            recalibrate(
                model,
                adaptation_data(cfg, model, datamodule),
                precise.batches,
                torch.device("cpu"),
                precise.norms(model),
                epoch=last_epoch,
            )
        steps = adapt_steps(cfg, model, datamodule)
    return after_training(cfg, measured, steps, first=step)


def run(cfg: DictConfig) -> dict:
    """Validate, set torch's thread count (``threads``), seed, then summary / pretrain / adapt; returns the metrics.

    A run whose directory already holds complete results of the same config (and data) is
    not repeated; a failing run records why in its ``metrics.json``.
    """
    cfg = without_hydra_node(cfg)
    validate(cfg)
    with torch_threads(cfg.get("threads")):  # before anything is built: it decides how floats are summed
        done = run_task(cfg)
    return done.to_dict() if isinstance(done, RunRecord) else done


def run_task(cfg: DictConfig) -> RunRecord | dict:
    if cfg.task in ("export", "predict", "evaluate"):  # no training; never skipped as complete
        from bnn_adapt.deploy.export import run_export  # noqa: PLC0415 - deployment sits beside the runtime
        from bnn_adapt.deploy.predict import run_predict  # noqa: PLC0415
        from bnn_adapt.run.evaluate import run_evaluate  # noqa: PLC0415

        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        return {"export": run_export, "predict": run_predict, "evaluate": run_evaluate}[cfg.task](cfg)
    if cfg.summary_only:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        return run_summary(cfg)
    tracking.check_installed(cfg)  # a tracker's missing package stops the run before any work
    if ranks.launched_rank() > 0:  # trainer=ddp_slurm: another rank of this run (ranks.py)
        return run_other_rank(cfg)
    with contextlib.ExitStack() as held:  # the run directory is ours while this runs (claims.py)
        claim = held.enter_context(claims.run_claim(cfg.paths.output_dir))
        done = skip_or_rerun(cfg, waited=claim.waited)
        if done is not None:
            return done
        chosen = choose_run_dir(cfg)
        if chosen.paths.output_dir != cfg.paths.output_dir:
            held.enter_context(claims.run_claim(chosen.paths.output_dir))
        cfg = chosen
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        try:
            earlier = failed_after_training(cfg) if cfg.get("resume") else None
            if earlier is not None:
                return resume_after_training(cfg, earlier)
            return run_pretrain(cfg) if cfg.task == "pretrain" else run_adapt(cfg)
        except Exception as exc:
            if not (isinstance(exc, FailedAfterTraining) and exc.run_dir == str(cfg.paths.output_dir)):
                record_failure(cfg, exc)  # (a failure after training has recorded its numbers beside itself)
            raise


def run_other_rank(cfg: DictConfig) -> RunRecord:
    """Rank k > 0 of a run started once per device: no claim (rank 0 holds it), the same skip decision as
    rank 0 (the run directory's results), then the same training, writing under ``<run dir>/rank<k>/``."""
    base_sha = adapted_base_sha256(cfg) if cfg.task == "adapt" else None
    done = completed(cfg.paths.output_dir, cfg, base_sha)
    if done is not None:
        return done
    cfg = ranks.rank_config(cfg, ranks.launched_rank())
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    return run_pretrain(cfg) if cfg.task == "pretrain" else run_adapt(cfg)


def sweeper_value(cfg: DictConfig, metrics: dict) -> Any:
    """What the task returns to a sweeper: ``metrics`` itself, or with ``optimized_metrics``
    configured (an Optuna search) those metrics' values in order -- a float for one, a tuple for
    several. A run without them (a failed one) returns its metrics, which Optuna records as failed."""
    names = cfg.get("optimized_metrics")
    if not names:
        return metrics
    record = RunRecord.from_dict(metrics)
    if record.status == PRUNED:  # the sweeper stores it as failed; the trial records why
        return RunRecord(status=PRUNED, pruned_after_epoch=record.pruned_after_epoch).to_dict()
    found = [record.value(name) for name in names]
    if any(value is None for value in found):
        return metrics
    values = tuple(float(value) for value in found)
    return values[0] if len(values) == 1 else values
