"""The one task function: instantiate from config, train, write results.

``run(cfg)`` handles ``task=pretrain`` (train a base on the base classes and
save it to ``base.save_to``), ``task=adapt`` (attach the configured adapter to
the frozen base from ``base.checkpoint`` and train it on the target classes)
and ``summary_only=true`` (build the model, count, no data). It returns the
metrics dict, which Hydra sweepers (Optuna included) read.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt import accounting
from bnn_adapt.bases import BaseNetwork, load_base, save_base
from bnn_adapt.callbacks import RunStats
from bnn_adapt.config import validate
from bnn_adapt.errors import CheckpointError, ConfigError, UserError
from bnn_adapt.lit_module import Classifier
from bnn_adapt.pruning import pruning_callbacks, prune_now
from bnn_adapt.results import config_hash, package_versions, write_json

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
    extra = {"num_classes": cfg.base.net.num_classes, "width": cfg.base.width} if cfg.base.name == "reactnet18" else {}
    return load_base(cfg.base.name, cfg.base.checkpoint, how, **extra)


def build_adapted(cfg: DictConfig, base: BaseNetwork, num_classes: int):
    return instantiate(cfg.adapter.model, base=base, num_classes=num_classes, freeze_bn=cfg.base.bn == "frozen")


def build_datamodule(cfg: DictConfig, split: str):
    return instantiate(cfg.data, split=split, _convert_="all")


def target_num_classes(cfg: DictConfig) -> int:
    """Known without reading data: the datamodule's constructor knows it."""
    return build_datamodule(cfg, "target").num_classes


def pruning_at_epoch(cfg: DictConfig) -> int:
    at = cfg.reduction.get("at_epoch")
    return int(at) if at is not None else max(1, cfg.trainer.max_epochs // 2)


def is_pruning(cfg: DictConfig) -> bool:
    return cfg.reduction.name == "prune" and (cfg.reduction.depthwise_rate > 0 or cfg.reduction.pointwise_rate > 0)


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
            prune_now(model, cfg.reduction.depthwise_rate, cfg.reduction.pointwise_rate)
        summary = accounting.summarize(model)
    print(accounting.layer_table(model))
    summary.update(task=cfg.task, config_hash=config_hash(cfg))
    write_json(Path(cfg.paths.output_dir) / "summary.json", summary)
    return summary


def make_trainer(cfg: DictConfig, extra_callbacks: list) -> tuple[L.Trainer, RunStats]:
    stats = RunStats()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + extra_callbacks + [stats]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return trainer, stats


def fit(cfg: DictConfig, model, num_classes: int, datamodule, extra_callbacks=()) -> dict:
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = Classifier(model, num_classes, instantiate(cfg.optimizer), scheduler)
    trainer, stats = make_trainer(cfg, list(extra_callbacks))
    trainer.fit(module, datamodule=datamodule)
    result = stats.summary()
    history = result["history"]
    if not history:
        return result
    result["test_top1"] = history[-1].get("val/acc")
    counted = history
    if is_pruning(cfg) and cfg.task == "adapt":
        at = pruning_at_epoch(cfg)
        before = [h["val/acc"] for h in history if h["epoch"] < at and "val/acc" in h]
        result["best_before_pruning_top1"] = max(before) if before else None
        counted = [h for h in history if h["epoch"] >= at] or history
    accs = [h["val/acc"] for h in counted if "val/acc" in h]
    result["best_test_top1"] = max(accs) if accs else None
    return result


def finish(cfg: DictConfig, result: dict, summary: dict) -> dict:
    metrics = {
        **result,
        **summary,
        "task": cfg.task,
        "seed": cfg.seed,
        "config_hash": config_hash(cfg),
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
    if cfg.base.checkpoint and not Path(cfg.base.checkpoint).is_file() and cfg.base.get("pretrain"):
        pretrain_missing_base(cfg)
    base = load_trained_base(cfg)
    model = build_adapted(cfg, base, datamodule.num_classes)
    callbacks = []
    if is_pruning(cfg):
        callbacks = pruning_callbacks(
            model, cfg.reduction.depthwise_rate, cfg.reduction.pointwise_rate, pruning_at_epoch(cfg)
        )
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


def run(cfg: DictConfig) -> dict:
    """Validate, seed, then summary / pretrain / adapt; returns the metrics."""
    cfg = without_hydra_node(cfg)
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.summary_only:
        return run_summary(cfg)
    if cfg.task == "pretrain":
        return run_pretrain(cfg)
    return run_adapt(cfg)
