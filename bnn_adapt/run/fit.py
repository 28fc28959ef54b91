"""Training with Lightning: one fit of a model on its data, resumable, returning the measured numbers.

The fit adds its callbacks (pruning plan, RNG state, trackers, a search trial's report, precise BN),
continues from the run's last checkpoint with ``resume=true`` (:mod:`bnn_adapt.run.resume`) and turns a
write that failed on a full or read-only disk into one line.
"""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import torch
from omegaconf import DictConfig

from bnn_adapt.errors import ConfigError
from bnn_adapt.files import WriteError, write_error, write_json
from bnn_adapt.run import builders, resume, tracking
from bnn_adapt.run.counts import configured_counts
from bnn_adapt.run.record import EPOCH_TOP1, PRUNED, RunRecord
from bnn_adapt.run.results import config_hash, dataset_identity
from bnn_adapt.search.trial_report import TrialReport
from bnn_adapt.training.lean import set_memory_mode
from bnn_adapt.training.module import Classifier
from bnn_adapt.training.precise_bn import PreciseBN, final_top1, trained_norms


def fit(
    cfg: DictConfig, model, num_classes: int, datamodule, plan=None, callbacks=(), before_fit=None
) -> tuple[RunRecord, BaseException | None]:
    """Train with Lightning; with ``resume=true`` continue from this run's last checkpoint.

    ``before_fit(device)``: called with the device the trainer will train on, before it starts.
    Returns the measured numbers, and the error of Lightning's end-of-fit hooks if they failed
    after every epoch had run (the numbers stand; :func:`after_training` records it)."""
    scheduler = builders.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    set_memory_mode(model, cfg.memory)
    if cfg.trainer.get("channels_last", False):  # convolutions then run NHWC whatever the images' layout
        model.to(memory_format=torch.channels_last)
    compiled = cfg.trainer.get("compile", False)
    builders.compile_model(model, compiled)
    module = Classifier(model, num_classes, builders.instantiate(cfg.optimizer), scheduler)
    callbacks = [*(plan.callbacks(model) if plan is not None else []), *callbacks, resume.RNGState()]

    @functools.cache
    def counts() -> RunRecord:
        with torch.random.fork_rng(devices=[]):  # building the counted model must not move the run's RNG
            return configured_counts(cfg)[1]

    if any(name != "csv" for name in tracking.logger_configs(cfg)):  # trackers get the config and the counts
        callbacks.append(tracking.TrackerRecords(tracking.run_hyperparameters(cfg, counts())))
    report = TrialReport.for_run(cfg, counts)  # a search's trial: its epochs to Optuna, maybe pruned
    callbacks += [report] if report is not None else []
    trainer, stats = builders.make_trainer(cfg, callbacks)
    if before_fit is not None:
        before_fit(trainer.strategy.root_device)
    out = Path(cfg.paths.output_dir)
    checkpoint = out / resume.CHECKPOINT
    data = dataset_identity(cfg)
    resuming = bool(cfg.get("resume")) and resume.unfinished(out, config_hash(cfg), data)
    write_json(out / resume.RUN_FILE, {"config_hash": config_hash(cfg), "data": data})  # its status: metrics.json
    kept_csv = resume.keep_csv_before_resume(out / "csv") if resuming else None
    fit_error = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if resuming else None)
    except torch._dynamo.exc.TorchDynamoException as exc:  # a failed torch.compile: say which key, not its traceback
        if not compiled:
            raise
        cause = getattr(exc, "inner_exception", None) or exc  # what the backend raised
        first = (str(cause).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"trainer.compile={compiled}: torch.compile failed ({type(cause).__name__}: {first}); "
            "set trainer.compile=false, or try trainer.compile=aot_eager"
        ) from exc
    except Exception as exc:
        if not stats.training_ended:
            raise failed_write(exc, out) from exc
        fit_error = failed_write(exc, out)
    if kept_csv is not None:
        resume.merge_resumed_csv(kept_csv, out / "csv", resumed_epoch=stats.resumed_at_epoch)
    stats.recover_spawned(trainer)  # trainer=ddp (ddp_spawn) trained in child processes
    result = RunRecord(**stats.summary())
    if report is not None and report.pruned_after_epoch is not None:
        result.status, result.pruned_after_epoch = PRUNED, report.pruned_after_epoch
    if not result.history:
        return result, fit_error
    # every epoch is evaluated on the validation split (data.val_fraction > 0) or, as in the thesis, the test set
    last = result.history[-1].get(EPOCH_TOP1)
    counted = result.history
    if plan is not None:  # best before the first round; the headline counts from the last round on
        before, counted = plan.counted_epochs(result.history)
        result.best_before_pruning_top1 = best_top1(before)
    result.set_top1(evaluated_split(datamodule), last, best_top1(counted))
    if datamodule.val_fraction:  # the test set, measured once, with the final weights
        tested = trainer.test(module, datamodule=datamodule, verbose=False)
        result.test_top1 = tested[0].get("test/acc") if tested else None
    return result, fit_error


def evaluated_split(datamodule) -> str:
    """What every epoch is evaluated on: the validation split (``data.val_fraction`` > 0) or, as in the thesis,
    the test set."""
    return "val" if datamodule.val_fraction else "test"


def best_top1(history: list[dict]) -> float | None:
    return max((h[EPOCH_TOP1] for h in history if EPOCH_TOP1 in h), default=None)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # what a write fails with, not a read


def failed_write(exc: Exception, run_dir: Path) -> Exception:
    """``exc``, or the one line it stands for when a write failed while fitting (a full or read-only disk):
    the first :class:`WriteError` in its chain (Lightning's loggers, closing on the same disk, fail again
    and hide it), else a :class:`WriteError` naming ``run_dir``, where Lightning writes its logs."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return exc
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, WriteError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        cause = write_error(exc.filename or run_dir, exc)
        cause.__cause__ = exc
    return cause


def precise_bn_callback(cfg: DictConfig, model) -> PreciseBN | None:
    """Precise BN for this fit (``base.precise_bn``): every BN of a base being pretrained; in an
    adaptation (``adaptation: true``) the BNs it trains, none where it trains none (a frozen base
    under a head or LoRA)."""
    settings = cfg.base.get("precise_bn") or {}
    adapting = cfg.task == "adapt"
    if not settings.get("enabled") or (adapting and not settings.get("adaptation", False)):
        return None
    if adapting and not trained_norms(model):
        return None
    return PreciseBN(settings.batches, settings.every_epoch, only_trained=adapting)


def with_precise_top1(result: RunRecord, precise: PreciseBN, datamodule) -> None:
    """The last epoch's top-1 with both statistics into ``result``; the network leaves the fit with the
    re-estimated ones (what is saved, exported and tested), so their top-1 is the headline."""
    # (trainer.test already ran on them)
    result.set_bn_top1(evaluated_split(datamodule), *final_top1(result.history or [], precise.every_epoch))
