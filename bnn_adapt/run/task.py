"""The one task function: instantiate from config, train, write results.

``run(cfg)`` handles ``task=pretrain`` (train a base on the base classes and
save it to ``base.save_to``), ``task=adapt`` (attach the configured adapter to
the frozen base from ``base.checkpoint``, train it on the target classes and
write its adapter file) and ``summary_only=true`` (build the model, count, no
data). It returns the metrics dict, which Hydra sweepers (Optuna included)
read. ``task=export`` (bit-packed base + adapter files) and ``task=predict``
(one base, many adapters) are deployment steps: :mod:`bnn_adapt.deploy`.
"""

from __future__ import annotations

import contextlib
import copy
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
from bnn_adapt.files import file_sha256, read_json_or_none, write_json
from bnn_adapt.run import builders, claims, preflight, resume, tracking
from bnn_adapt.run.config import validate, without_hydra_node
from bnn_adapt.run.results import completed_metrics, config_hash, package_versions
from bnn_adapt.training import tap_cache
from bnn_adapt.training.best_epoch import KeepBestEpoch
from bnn_adapt.training.lean import set_memory_mode
from bnn_adapt.training.module import Classifier


def configured_counts(cfg: DictConfig) -> tuple[nn.Module, dict]:
    """The configured model, built without data, and its counts as the run will leave them
    (parameters, size, MACs for one image of ``data.image_size``)."""
    if cfg.task == "pretrain":
        model = builders.build_base(cfg)
        fp32, binary = accounting.totals(accounting.parameter_rows(model))
        return model, {"base_binary_params": binary, "base_fp32_params": fp32,
                       **operation_counts(model, cfg.data.image_size)}  # fmt: skip
    checkpoint = builders.base_checkpoint_file(cfg)
    have_checkpoint = checkpoint and Path(checkpoint).is_file()
    base = builders.load_trained_base(cfg) if have_checkpoint else builders.build_base(cfg)
    model = builders.build_adapted(cfg, base, builders.target_num_classes(cfg))
    plan = builders.pruning_plan(cfg)
    if plan is not None:
        plan.apply(model)  # the counts the run will leave
    return model, accounting.summarize(model, cfg.data.image_size)


def run_summary(cfg: DictConfig) -> dict:
    """Build the configured model, print its per-layer tables (parameters, MACs), write summary.json."""
    model, summary = configured_counts(cfg)
    print(accounting.layer_table(model))
    print(mac_table(summary))
    summary.update(task=cfg.task, config_hash=config_hash(cfg))
    write_json(Path(cfg.paths.output_dir) / "summary.json", summary)
    return summary


def fit(cfg: DictConfig, model, num_classes: int, datamodule, plan=None, callbacks=()) -> dict:
    """Train with Lightning; with ``resume=true`` continue from this run's last checkpoint."""
    scheduler = builders.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    set_memory_mode(model, cfg.memory)
    module = Classifier(model, num_classes, builders.instantiate(cfg.optimizer), scheduler)
    callbacks = [*(plan.callbacks(model) if plan is not None else []), *callbacks, resume.RNGState()]
    if any(name != "csv" for name in tracking.logger_configs(cfg)):  # trackers get the config and the counts
        with torch.random.fork_rng(devices=[]):  # building the counted model must not move the run's RNG
            counts = configured_counts(cfg)[1]
        callbacks.append(tracking.TrackerRecords(tracking.run_hyperparameters(cfg, counts)))
    trainer, stats = builders.make_trainer(cfg, callbacks)
    out = Path(cfg.paths.output_dir)
    checkpoint = out / resume.CHECKPOINT
    resuming = bool(cfg.get("resume")) and resume.unfinished(out, config_hash(cfg))
    write_json(out / resume.RUN_FILE, {"config_hash": config_hash(cfg), "status": "running"})
    kept_csv = resume.keep_csv_before_resume(out / "csv") if resuming else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if resuming else None)
    if kept_csv is not None:
        resume.merge_resumed_csv(kept_csv, out / "csv", resumed_epoch=stats.resumed_at_epoch)
    stats.recover_spawned(trainer)  # trainer=ddp (ddp_spawn) trained in child processes
    result = stats.summary()
    history = result["history"]
    if not history:
        return result
    result["test_top1"] = history[-1].get("val/acc")
    counted = history
    if plan is not None:  # best before the first round; the headline counts from the last round on
        before, counted = plan.counted_epochs(history)
        accs = [h["val/acc"] for h in before if "val/acc" in h]
        result["best_before_pruning_top1"] = max(accs) if accs else None
    accs = [h["val/acc"] for h in counted if "val/acc" in h]
    result["best_test_top1"] = max(accs) if accs else None
    return result


def finish(cfg: DictConfig, result: dict, summary: dict) -> dict:
    metrics = {
        "status": "complete",
        **result,
        **summary,
        "task": cfg.task,
        "seed": cfg.seed,
        "config_hash": config_hash(cfg),
        **({"base_checkpoint_sha256": adapted_base_sha256(cfg)} if cfg.task == "adapt" else {}),
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out = Path(cfg.paths.output_dir)
    write_json(out / "metrics.json", metrics)
    top1 = metrics.get("test_top1")
    line = f"{cfg.task} done: top-1 {top1:.4f}" if top1 is not None else f"{cfg.task} done"
    if "size_pct" in metrics:
        line += f", size {metrics['size_pct']:.3f}% of the base"
    if metrics.get("epoch_time_s"):
        line += f", {metrics['epoch_time_s']:.2f} s/epoch"
    print(f"{line}; results in {out / 'metrics.json'}")
    return metrics


def run_pretrain(cfg: DictConfig) -> dict:
    datamodule = builders.build_datamodule(cfg, "base")
    base = builders.build_base(cfg)
    if base.num_classes != datamodule.num_classes:
        raise ConfigError(
            f"base has {base.num_classes} classes but data.base_classes lists {datamodule.num_classes}"
        )
    meta = {"base_classes": datamodule.class_names, "image_size": cfg.data.image_size,
            "config": OmegaConf.to_container(cfg, resolve=True)}  # fmt: skip
    best = KeepBestEpoch(best_epoch_path(cfg.base.save_to), meta)  # the epoch the thesis adapted (base.epoch=best)
    result = fit(cfg, base, datamodule.num_classes, datamodule, callbacks=[best])
    save_base(base, cfg.base.save_to, **meta, top1=result.get("test_top1"), epoch=result.get("epochs_run", 0) - 1)
    fp32, binary = accounting.totals(accounting.parameter_rows(base))
    summary = {"base_binary_params": binary, "base_fp32_params": fp32, "base_checkpoint": str(cfg.base.save_to),
               "best_epoch_checkpoint": str(best.path), "best_epoch": best.epoch,
               **operation_counts(base, cfg.data.image_size)}  # fmt: skip
    return finish(cfg, result, summary)


def run_adapt(cfg: DictConfig) -> dict:
    datamodule = builders.build_datamodule(cfg, "target")
    # build on a fresh base first: config errors (and a pruning schedule that cannot fit) surface before training
    builders.build_adapted(cfg, builders.build_base(cfg), datamodule.num_classes)
    preflight.check_base(cfg)  # a missing base: one line naming the command that makes it
    if preflight.pretrains_missing_base(cfg):  # its default place only; one run pretrains it, others wait
        with claims.file_claim(cfg.base.checkpoint, f"base checkpoint {cfg.base.checkpoint}"):
            if not Path(cfg.base.checkpoint).is_file():
                sub = builders.pretraining_config(cfg)
                print(f"no base checkpoint at {cfg.base.checkpoint}: pretraining it first "
                      f"({sub.trainer.max_epochs} epochs)")  # fmt: skip
                L.seed_everything(sub.seed, workers=True, verbose=False)  # the base a pretraining run would train
                run_pretrain(sub)
    # the same adaptation whether or not this run pretrained its base (and whatever the check above drew)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    base = builders.load_trained_base(cfg)
    model = builders.build_adapted(cfg, base, datamodule.num_classes)
    plan = builders.pruning_plan(cfg)
    training_data = datamodule
    if cfg.tap_cache.enabled:
        training_data = tap_cache.TapCacheDataModule(datamodule, model, cfg.tap_cache.views, cfg.tap_cache.max_gb)
    elif cfg.tap_cache.views > 1:
        print(f"note: tap_cache.views={cfg.tap_cache.views} has no effect without tap_cache.enabled=true", file=sys.stderr)
    result = fit(cfg, model, datamodule.num_classes, training_data, plan)
    export_adapter(model, Path(cfg.paths.output_dir) / ADAPTER_FILE, reference_base=builders.load_trained_base(cfg),
                   class_names=datamodule.class_names, preprocess=builders.preprocessing(datamodule),
                   source={"run_dir": str(cfg.paths.output_dir), "config_hash": config_hash(cfg)})  # fmt: skip
    summary = accounting.summarize(model, cfg.data.image_size)
    summary["class_names"] = datamodule.class_names
    return finish(cfg, result, summary)


def choose_run_dir(cfg: DictConfig) -> DictConfig:
    """With ``resume=true``, continue the newest unfinished run of this config."""
    output_dir = Path(cfg.paths.output_dir)
    found = resume.find_resumable(output_dir, output_dir.parent, config_hash(cfg)) if cfg.get("resume") else None
    if cfg.get("resume") and found is None:
        print(f"resume=true: no unfinished run of this config under {output_dir.parent}; starting afresh")
    if found is None or found == output_dir:
        return cfg
    print(f"resuming the unfinished run in {found}")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(found)
    return cfg


def adapted_base_sha256(cfg: DictConfig) -> str | None:
    """What an adaptation run records of its base: the SHA-256 of the checkpoint file it reads."""
    return file_sha256(builders.base_checkpoint_file(cfg))


def pretrained_files_missing(cfg: DictConfig) -> list[str]:
    """What a finished pretraining run wrote and is gone (its base, last and best epoch): it runs again."""
    last = Path(cfg.base.save_to)
    return [str(p) for p in (last, best_epoch_path(last)) if not p.is_file()]


def record_failure(cfg: DictConfig, exc: BaseException) -> None:
    """A failed run leaves its reason where its results would be."""
    write_json(
        Path(cfg.paths.output_dir) / "metrics.json",
        {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "task": cfg.get("task"),
            "seed": cfg.get("seed"),
            "config_hash": config_hash(cfg),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )


def run(cfg: DictConfig) -> dict:
    """Validate, seed, then summary / pretrain / adapt; returns the metrics.

    A run whose directory already holds complete results of the same config is
    not repeated; a failing run records why in its ``metrics.json``.
    """
    cfg = without_hydra_node(cfg)
    validate(cfg)
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
            return run_pretrain(cfg) if cfg.task == "pretrain" else run_adapt(cfg)
        except Exception as exc:
            record_failure(cfg, exc)
            raise


def skip_or_rerun(cfg: DictConfig, waited: bool) -> dict | None:
    """The complete results of this config already in its directory (the run is skipped), else None.

    ``waited``: another process held the directory until now; if it failed there, this one does
    not run the same config again (two invocations of one sweep run each row once).
    """
    base_sha = adapted_base_sha256(cfg) if cfg.task == "adapt" else None
    done = completed_metrics(cfg.paths.output_dir, config_hash(cfg), base_sha)
    missing = pretrained_files_missing(cfg) if done is not None and cfg.task == "pretrain" else []
    if missing:
        print(f"the complete run in {cfg.paths.output_dir} left no {' or '.join(missing)}: running it again")
        return None
    if done is not None:
        print(f"already complete (config {done['config_hash']}): {Path(cfg.paths.output_dir) / 'metrics.json'}")
        return done
    earlier = read_json_or_none(Path(cfg.paths.output_dir) / "metrics.json") or {}
    same_config = earlier.get("config_hash") == config_hash(cfg)
    if waited and same_config and earlier.get("status") == "failed":
        raise UserError(f"this run failed in the process that held {cfg.paths.output_dir} until now: "
                        f"{earlier.get('error')}; not running it again")  # fmt: skip
    if earlier.get("status") == "complete" and same_config:
        print(f"base checkpoint {cfg.base.checkpoint} changed since the complete run in "
              f"{cfg.paths.output_dir}: running it again")  # fmt: skip
    return None


def sweeper_value(cfg: DictConfig, metrics: dict) -> Any:
    """What the task returns to a sweeper: ``metrics`` itself, or with ``optimized_metrics``
    configured (an Optuna search) those metrics' values in order -- a float for one, a tuple for
    several. A run without them (a failed one) returns its metrics, which Optuna records as failed."""
    names = cfg.get("optimized_metrics")
    if not names:
        return metrics
    if any(metrics.get(name) is None for name in names):
        return metrics
    values = tuple(float(metrics[name]) for name in names)
    return values[0] if len(values) == 1 else values
