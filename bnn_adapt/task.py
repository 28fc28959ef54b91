"""The one task function: instantiate from config, train, write results.

``run(cfg)`` handles ``task=pretrain`` (train a base on the base classes and
save it to ``base.save_to``), ``task=adapt`` (attach the configured adapter to
the frozen base from ``base.checkpoint`` and train it on the target classes)
and ``summary_only=true`` (build the model, count, no data). It returns the
metrics dict, which Hydra sweepers (Optuna included) read. ``task=export``
(bit-packed base + adapter files) and ``task=predict`` (one base, many
adapters) are deployment steps: :mod:`bnn_adapt.export`, :mod:`bnn_adapt.predict`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt import accounting, resume, tap_cache
from bnn_adapt.bases import BaseNetwork, load_base, save_base
from bnn_adapt.callbacks import RunStats
from bnn_adapt.config import validate
from bnn_adapt.errors import CheckpointError, ConfigError, UserError
from bnn_adapt.lean import set_memory_mode
from bnn_adapt.lit_module import Classifier
from bnn_adapt.head_pruning import HeadColumnPruning, make_head_prunable, prune_head_columns
from bnn_adapt.pruning import (
    cumulative_fraction,
    iterative_pruning_callbacks,
    iterative_schedule,
    pruning_callbacks,
    prune_now,
)
from bnn_adapt.results import completed_metrics, config_hash, file_sha256, package_versions, read_json_or_none, write_json

log = logging.getLogger(__name__)


def instantiate(config, *args, **kwargs):
    """``hydra.utils.instantiate``, letting our own errors through unwrapped.

    Hydra wraps whatever a ``_target_`` raises in an ``InstantiationException``;
    a :class:`UserError` (a bad ``reduction.groups``, unknown class ids, ...)
    must reach the command line as itself, to be shown as one ``error:`` line.
    """
    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def build_base(cfg: DictConfig) -> BaseNetwork:
    """A freshly initialised base of the configured architecture."""
    return instantiate(cfg.base.net)


def load_trained_base(cfg: DictConfig) -> BaseNetwork:
    how = cfg.base.how_to_get
    if cfg.base.checkpoint is None:
        raise CheckpointError(f"no base checkpoint given; {how}")
    if cfg.base.name == "reactnet18":  # the authors' format: shapes tell width and classes
        return load_base(cfg.base.name, cfg.base.checkpoint, how, num_classes=cfg.base.net.num_classes,
                         width=cfg.base.width)  # fmt: skip
    net = OmegaConf.to_container(cfg.base.net, resolve=True)
    # the base's own classes do not matter here: adaptation replaces its classifier
    expected = {k: v for k, v in net.items() if k not in ("_target_", "num_classes")} | {"image_size": cfg.data.image_size}
    return load_base(cfg.base.name, cfg.base.checkpoint, how, expected=expected)


def build_adapted(cfg: DictConfig, base: BaseNetwork, num_classes: int):
    model = instantiate(cfg.adapter.model, base=base, num_classes=num_classes, freeze_bn=cfg.base.bn == "frozen")
    if head_rate(cfg) > 0:
        make_head_prunable(model)
    return model


def build_datamodule(cfg: DictConfig, split: str):
    datamodule = instantiate(cfg.data, split=split, _convert_="all")
    if datamodule.num_classes < 2:
        raise ConfigError(
            f"the {split} split has {datamodule.num_classes} class; a classifier needs at least 2 "
            f"(data.{split}_classes)"
        )
    return datamodule


def target_num_classes(cfg: DictConfig) -> int:
    """Known without reading data: the datamodule's constructor knows it."""
    return build_datamodule(cfg, "target").num_classes


def pruning_at_epoch(cfg: DictConfig) -> int:
    at = cfg.reduction.get("at_epoch")
    return int(at) if at is not None else max(1, cfg.trainer.max_epochs // 2)


def head_rate(cfg: DictConfig) -> float:
    return float(cfg.reduction.get("head_rate") or 0.0)


def pruning_epochs(cfg: DictConfig) -> list[int]:
    """Epochs before which pruning happens: one (``prune``) or one per round (``prune_iterative``)."""
    if cfg.reduction.name == "prune_iterative":
        r = cfg.reduction
        return iterative_schedule(r.rounds, r.get("at_epochs"), cfg.trainer.max_epochs)
    return [pruning_at_epoch(cfg)]


def is_pruning(cfg: DictConfig) -> bool:
    r = cfg.reduction
    return r.name in ("prune", "prune_iterative") and (
        r.depthwise_rate > 0 or r.pointwise_rate > 0 or head_rate(cfg) > 0
    )


def prune_for_summary(cfg: DictConfig, model) -> None:
    """Prune as training will (all rounds), so counts are what the run will leave."""
    rounds = len(pruning_epochs(cfg))
    prune_now(model, cfg.reduction.depthwise_rate, cfg.reduction.pointwise_rate, rounds=rounds)
    if head_rate(cfg) > 0:
        prune_head_columns(model, head_rate(cfg))


def reduction_callbacks(cfg: DictConfig, model) -> list:
    """The pruning callbacks of ``reduction=prune|prune_iterative`` (adapter weights, head columns)."""
    r, epochs = cfg.reduction, pruning_epochs(cfg)
    if r.name == "prune_iterative":
        callbacks = iterative_pruning_callbacks(model, r.depthwise_rate, r.pointwise_rate, epochs, bool(r.rewind))
    else:
        callbacks = pruning_callbacks(model, r.depthwise_rate, r.pointwise_rate, epochs[0])
    if head_rate(cfg) > 0:
        schedule = {at - 1: cumulative_fraction(head_rate(cfg), k, len(epochs)) for k, at in enumerate(epochs, 1)}
        callbacks.append(HeadColumnPruning(model, schedule))
    return callbacks


def run_summary(cfg: DictConfig) -> dict:
    """Build the configured model, print its per-layer table, write summary.json."""
    if cfg.task == "pretrain":
        model = build_base(cfg)
        fp32, binary = accounting.totals(accounting.parameter_rows(model))
        summary = {"base_binary_params": binary, "base_fp32_params": fp32}
    else:
        have_checkpoint = cfg.base.checkpoint and Path(cfg.base.checkpoint).is_file()
        base = load_trained_base(cfg) if have_checkpoint else build_base(cfg)
        model = build_adapted(cfg, base, target_num_classes(cfg))
        if is_pruning(cfg):
            prune_for_summary(cfg, model)
        summary = accounting.summarize(model)
    print(accounting.layer_table(model))
    summary.update(task=cfg.task, config_hash=config_hash(cfg))
    write_json(Path(cfg.paths.output_dir) / "summary.json", summary)
    return summary


def lightning_trainer_config(cfg: DictConfig) -> dict:
    """``cfg.trainer`` without our own keys (``memory``): what ``lightning.Trainer`` takes."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.pop("memory", None)
    return trainer


def make_trainer(cfg: DictConfig, extra_callbacks: list) -> tuple[L.Trainer, RunStats]:
    stats = RunStats()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + extra_callbacks + [stats]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    try:
        trainer = instantiate(lightning_trainer_config(cfg), callbacks=callbacks, logger=loggers)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, MisconfigurationException):  # e.g. accelerator=gpu on a machine without one
            raise ConfigError(f"trainer: {cause}") from None
        raise
    return trainer, stats


def fit(cfg: DictConfig, model, num_classes: int, datamodule, extra_callbacks=()) -> dict:
    """Train with Lightning; with ``resume=true`` continue from this run's last checkpoint."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    set_memory_mode(model, OmegaConf.select(cfg, "trainer.memory", default="standard"))
    module = Classifier(model, num_classes, instantiate(cfg.optimizer), scheduler)
    trainer, stats = make_trainer(cfg, [*extra_callbacks, resume.RNGState()])
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
    if is_pruning(cfg) and cfg.task == "adapt":
        epochs = pruning_epochs(cfg)  # best before the first round; headline counts from the last on
        before = [h["val/acc"] for h in history if h["epoch"] < epochs[0] and "val/acc" in h]
        result["best_before_pruning_top1"] = max(before) if before else None
        counted = [h for h in history if h["epoch"] >= epochs[-1]] or history
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
    datamodule = build_datamodule(cfg, "base")
    base = build_base(cfg)
    if base.num_classes != datamodule.num_classes:
        raise ConfigError(
            f"base has {base.num_classes} classes but data.base_classes lists {datamodule.num_classes}"
        )
    result = fit(cfg, base, datamodule.num_classes, datamodule)
    save_base(base, cfg.base.save_to, base_classes=datamodule.class_names, top1=result.get("test_top1"),
              image_size=cfg.data.image_size,
              config=OmegaConf.to_container(cfg, resolve=True))
    fp32, binary = accounting.totals(accounting.parameter_rows(base))
    summary = {"base_binary_params": binary, "base_fp32_params": fp32, "base_checkpoint": str(cfg.base.save_to)}
    return finish(cfg, result, summary)


def pretrain_missing_base(cfg: DictConfig) -> None:
    """Train and cache the base first (the embedded default does this)."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.task = "pretrain"
        sub.trainer.max_epochs = cfg.base.pretrain.epochs
        sub.optimizer.lr = cfg.base.pretrain.lr
        sub.base.save_to = cfg.base.checkpoint
        sub.paths.output_dir = str(Path(cfg.paths.output_dir) / "base_pretrain")
    print(f"no base checkpoint at {cfg.base.checkpoint}: pretraining it first ({sub.trainer.max_epochs} epochs)")
    run_pretrain(sub)


def run_adapt(cfg: DictConfig) -> dict:
    datamodule = build_datamodule(cfg, "target")
    # build on a fresh base first: config errors surface before any training
    build_adapted(cfg, build_base(cfg), datamodule.num_classes)
    if is_pruning(cfg):
        pruning_epochs(cfg)  # a prune_iterative schedule that cannot fit the epochs
    if cfg.base.checkpoint and not Path(cfg.base.checkpoint).is_file() and cfg.base.get("pretrain"):
        pretrain_missing_base(cfg)
    base = load_trained_base(cfg)
    model = build_adapted(cfg, base, datamodule.num_classes)
    callbacks = reduction_callbacks(cfg, model) if is_pruning(cfg) else []
    datamodule = tap_cache.maybe_cache(cfg, model, datamodule)
    result = fit(cfg, model, datamodule.num_classes, datamodule, callbacks)
    save_introduced(model, Path(cfg.paths.output_dir) / "adapter.safetensors")
    summary = accounting.summarize(model)
    summary["class_names"] = datamodule.class_names
    return finish(cfg, result, summary)


def save_introduced(model, path: Path) -> None:
    """The trained adapter + head (what the task adds) as safetensors."""
    from safetensors.torch import save_file

    state = {}
    for part, modules in model.introduced_modules().items():
        for i, m in enumerate(modules):
            for key, value in m.state_dict().items():
                state[f"{part}.{i}.{key}"] = value.detach().contiguous().cpu()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"strategy": model.strategy})
    tmp.replace(path)


def without_hydra_node(cfg: DictConfig) -> DictConfig:
    """The experiment config alone, as ``@hydra.main`` passes it.

    A config composed with ``compose(..., return_hydra_config=True)`` (tests,
    notebooks) also carries Hydra's own runtime node, parts of which
    (``hydra.sweep.subdir: ${hydra.job.num}``) cannot be resolved outside a
    Hydra job: resolving it for metrics.json / the config hash would fail, and
    it is no part of the experiment anyway.
    """
    if "hydra" not in cfg:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


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
    """What an adaptation run records of its base: the checkpoint file's SHA-256."""
    return file_sha256(cfg.base.get("checkpoint"))


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
        from bnn_adapt.export import run_export  # noqa: PLC0415 - they import this module
        from bnn_adapt.predict import run_predict  # noqa: PLC0415

        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        return run_export(cfg) if cfg.task == "export" else run_predict(cfg)
    if not cfg.summary_only:
        base_sha = adapted_base_sha256(cfg) if cfg.task == "adapt" else None
        done = completed_metrics(cfg.paths.output_dir, config_hash(cfg), base_sha)
        if done is not None:
            print(f"already complete (config {done['config_hash']}): {Path(cfg.paths.output_dir) / 'metrics.json'}")
            return done
        earlier = read_json_or_none(Path(cfg.paths.output_dir) / "metrics.json") or {}
        if earlier.get("status") == "complete" and earlier.get("config_hash") == config_hash(cfg):
            print(f"base checkpoint {cfg.base.checkpoint} changed since the complete run in "
                  f"{cfg.paths.output_dir}: running it again")  # fmt: skip
        cfg = choose_run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.summary_only:
        return run_summary(cfg)
    try:
        return run_pretrain(cfg) if cfg.task == "pretrain" else run_adapt(cfg)
    except Exception as exc:
        record_failure(cfg, exc)
        raise
