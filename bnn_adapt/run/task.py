"""The one task function: instantiate from config, train, write results.

``run(cfg)`` handles ``task=pretrain`` (train a base on the base classes and
save it to ``base.save_to``), ``task=adapt`` (attach the configured adapter to
the frozen base from ``base.checkpoint``, train it on the target classes and
write its adapter file) and ``summary_only=true`` (build the model, count, no
data). It returns the metrics dict, which Hydra sweepers (Optuna included)
read. ``task=export`` (bit-packed base + adapter files) and ``task=predict``
(one base, many adapters) are deployment steps: :mod:`bnn_adapt.deploy`.

What follows training runs as named steps that never lose the measured numbers
(:mod:`bnn_adapt.run.records`); ``resume=true`` redoes a failed one from the
run's last checkpoint, without training again (:func:`resume_after_training`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bnn_adapt import accounting
from bnn_adapt.accounting.operations import mac_table, operation_counts
from bnn_adapt.adapters.file import ADAPTER_FILE, export_adapter
from bnn_adapt.bases import save_base
from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.errors import ConfigError, UserError
from bnn_adapt.files import WriteError, write_error, write_json
from bnn_adapt.run import builders, claims, preflight, ranks, resume, tracking
from bnn_adapt.run.config import validate, without_hydra_node
from bnn_adapt.run.provenance import torch_threads
from bnn_adapt.run.record import (
    COMPLETE,
    EPOCH_TOP1,
    FAILED,
    FAILED_AFTER_TRAINING,
    PRUNED,
    RunRecord,
    completed,
    result_problem,
)
from bnn_adapt.run.records import (
    ADAPTER_FILE_STEP,
    BASE_FILE_STEP,
    FailedAfterTraining,
    adapted_base_sha256,
    after_training,
    record_failure,
)
from bnn_adapt.run.results import config_hash, dataset_identity
from bnn_adapt.search import study
from bnn_adapt.search.trial_report import TrialReport
from bnn_adapt.training import tap_cache
from bnn_adapt.training.best_epoch import KeepBestEpoch
from bnn_adapt.training.lean import set_memory_mode
from bnn_adapt.training.module import Classifier
from bnn_adapt.training.precise_bn import PreciseBN, final_top1, recalibrate, trained_norms


def configured_counts(cfg: DictConfig) -> tuple[nn.Module, RunRecord]:
    """The configured model, built without data, and its counts as the run will leave them
    (parameters, size, MACs for one image of ``data.image_size``)."""
    if cfg.task == "pretrain":
        model = builders.build_base(cfg)
        return model, base_counts(model, cfg.data.image_size)
    checkpoint = builders.base_checkpoint_file(cfg)
    have_checkpoint = checkpoint and Path(checkpoint).is_file()
    base = builders.load_trained_base(cfg) if have_checkpoint else builders.build_base(cfg)
    model = builders.build_adapted(cfg, base, builders.target_num_classes(cfg))
    plan = builders.pruning_plan(cfg)
    if plan is not None:
        plan.apply(model)  # the counts the run will leave
    return model, RunRecord(**accounting.summarize(model, cfg.data.image_size))


def base_counts(base: nn.Module, image_size: int) -> RunRecord:
    """A base's parameters and its MACs for one image of ``image_size``."""
    fp32, binary = accounting.totals(accounting.parameter_rows(base))
    return RunRecord(base_binary_params=binary, base_fp32_params=fp32, **operation_counts(base, image_size))


def run_summary(cfg: DictConfig) -> RunRecord:
    """Build the configured model, print its per-layer tables (parameters, MACs), write summary.json."""
    model, summary = configured_counts(cfg)
    print(accounting.layer_table(model))
    print(mac_table(summary.to_dict()))
    summary.task, summary.config_hash = cfg.task, config_hash(cfg)
    summary.write(Path(cfg.paths.output_dir) / "summary.json")
    return summary


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


def choose_run_dir(cfg: DictConfig) -> DictConfig:
    """With ``resume=true``, continue the newest unfinished run of this config."""
    output_dir = Path(cfg.paths.output_dir)
    found = (
        resume.find_resumable(output_dir, output_dir.parent, config_hash(cfg), dataset_identity(cfg))
        if cfg.get("resume")
        else None
    )
    if cfg.get("resume") and found is None:
        print(f"resume=true: no unfinished run of this config under {output_dir.parent}; starting afresh")
    if found is None or found == output_dir:
        return cfg
    print(f"resuming the unfinished run in {found}")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(found)
    return cfg


def pretrained_files_missing(cfg: DictConfig) -> list[str]:
    """What a finished pretraining run wrote and is gone (its base, last and best epoch): it runs again."""
    last = Path(cfg.base.save_to)
    return [str(p) for p in (last, best_epoch_path(last)) if not p.is_file()]


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
    if cfg.task in ("export", "predict"):  # deployment: no training, no metrics.json
        from bnn_adapt.deploy.export import run_export  # noqa: PLC0415 - deployment sits beside the runtime
        from bnn_adapt.deploy.predict import run_predict  # noqa: PLC0415

        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        return run_export(cfg) if cfg.task == "export" else run_predict(cfg)
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


def failed_after_training(cfg: DictConfig) -> RunRecord | None:
    """The record of this config's run that trained and failed after training, while it still stands
    (same config, data and base, checkpoint kept), else None."""
    out = Path(cfg.paths.output_dir)
    earlier = RunRecord.read(out)
    if not earlier or earlier.status != FAILED_AFTER_TRAINING or not (out / resume.CHECKPOINT).is_file():
        return None
    if result_problem(earlier, cfg) is not None:
        return None
    same_base = cfg.task != "adapt" or earlier.base_checkpoint_sha256 == adapted_base_sha256(cfg)
    return earlier if same_base else None


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


def skip_or_rerun(cfg: DictConfig, waited: bool) -> RunRecord | None:
    """The complete results of this config already in its directory (the run is skipped), else None.

    ``waited``: another process held the directory until now; if it failed there, this one does
    not run the same config again (two invocations of one sweep run each row once).
    """
    base_sha = adapted_base_sha256(cfg) if cfg.task == "adapt" else None
    done = completed(cfg.paths.output_dir, cfg, base_sha)
    missing = pretrained_files_missing(cfg) if done is not None and cfg.task == "pretrain" else []
    if missing:
        print(f"the complete run in {cfg.paths.output_dir} left no {' or '.join(missing)}: running it again")
        return None
    if done is not None:
        print(f"already complete (config {done.config_hash}): {Path(cfg.paths.output_dir) / 'metrics.json'}")
        return done
    twin = study.finished_twin(cfg, base_sha) if cfg.task == "adapt" else None
    if twin is not None:  # a search's trial whose configuration another trial trained
        return twin
    out = Path(cfg.paths.output_dir)
    earlier = RunRecord.read(out) or RunRecord(status=FAILED)
    same_config = earlier.config_hash == config_hash(cfg)
    if waited and same_config and earlier.failed:
        raise UserError(
            f"this run failed in the process that held {out} until now: {earlier.error}; not running it again"
        )
    if earlier.complete and same_config:
        problem = result_problem(earlier, cfg)
        if problem:
            print(f"the complete run in {out} no longer stands for this config ({problem}): running it again")
        else:
            print(f"base checkpoint {cfg.base.checkpoint} changed since the complete run in {out}: running it again")
    return None


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
