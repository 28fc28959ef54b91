"""One builder per object a run needs, from its config: base, adapted model, data, pruning plan, trainer.

The task (:mod:`bnn_adapt.run.task`), export, ``make sizes`` and the benchmark
all build through these, so a config means the same model everywhere.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
from hydra.utils import instantiate as hydra_instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt.bases import BaseNetwork, base_class, load_base
from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.errors import ConfigError
from bnn_adapt.run import tracking
from bnn_adapt.run.config import TRUSTED_TARGETS
from bnn_adapt.run.console import MacSummary
from bnn_adapt.run.resume import CheckpointFiles
from bnn_adapt.training.callbacks import RunStats
from bnn_adapt.training.pruning import PruningPlan


def instantiate(config, *args, **kwargs):
    """``hydra.utils.instantiate`` of our configs' targets (``TRUSTED_TARGETS``, Hydra 1.4's execution
    whitelist). Hydra 1.4 raises what a ``_target_`` raises as it is (1.3 wrapped it in an
    ``InstantiationException``), so a :class:`UserError` (a bad ``adapter.groups``, unknown class
    ids, ...) reaches the command line as itself, one ``error:`` line."""
    made = hydra_instantiate(config, *args, _execution_whitelist_=TRUSTED_TARGETS, **kwargs)
    if isinstance(made, functools.partial) and type(made) is not functools.partial:
        # a ``_partial_`` (the optimizer, the scheduler): Hydra 1.4 returns a partial that re-checks the
        # whitelist when called and refuses to be pickled, which trainer=ddp (ddp_spawn) does to the
        # module; its target passed the whitelist here already, so a plain partial of it is the same
        made = functools.partial(made.func, *made.args, **made.keywords)
    return made


def build_base(cfg: DictConfig) -> BaseNetwork:
    """A freshly initialised base of the configured architecture (any :class:`BaseNetwork` on the path)."""
    net = OmegaConf.to_container(cfg.base.net, resolve=True)
    return base_class(net.pop("_target_"))(**net)


def base_checkpoint_file(cfg: DictConfig) -> str | None:
    """The file adaptation reads: ``base.checkpoint`` (its last epoch), or with ``base.epoch=best`` the
    best-test-accuracy epoch pretraining kept beside it (the thesis's protocol). A released checkpoint
    (its authors' best, as ReActNet's ``model_best``) is read as it is either way."""
    checkpoint = cfg.base.checkpoint
    released = base_class(cfg.base.net._target_).load_released is not None
    if checkpoint is None or cfg.base.get("epoch", "last") == "last" or released:
        return checkpoint
    return str(best_epoch_path(checkpoint))


def load_trained_base(cfg: DictConfig) -> BaseNetwork:
    """The pretrained base at :func:`base_checkpoint_file`; refused when built for another architecture."""
    from bnn_adapt.errors import CheckpointError  # noqa: PLC0415

    how = cfg.base.how_to_get
    checkpoint = base_checkpoint_file(cfg)
    if checkpoint is None:
        raise CheckpointError(f"no base checkpoint given; {how}")
    kind = base_class(cfg.base.net._target_)
    if kind.load_released is not None:  # the authors' format: no architecture recorded
        return load_base(kind.arch, checkpoint, how, num_classes=cfg.base.net.num_classes, width=cfg.base.width)
    if checkpoint != cfg.base.checkpoint and not Path(checkpoint).is_file() and Path(cfg.base.checkpoint).is_file():
        how = (
            "base.epoch=best reads the best-test-accuracy epoch that pretraining keeps beside its last one; "
            "pretrain this base again to write it, or set base.epoch=last"
        )
    net = OmegaConf.to_container(cfg.base.net, resolve=True)
    # the base's own classes do not matter here: adaptation replaces its classifier
    expected = {k: v for k, v in net.items() if k not in ("_target_", "num_classes")} | {
        "image_size": cfg.data.image_size
    }
    return load_base(kind.arch, checkpoint, how, expected=expected)


def pruning_plan(cfg: DictConfig) -> PruningPlan | None:
    """What ``reduction`` will prune, and when (None: nothing)."""
    return PruningPlan.from_config(cfg.reduction, cfg.trainer.max_epochs)


def build_adapted(cfg: DictConfig, base: BaseNetwork, num_classes: int):
    """The configured strategy on ``base``, prepared for its pruning plan."""
    model = instantiate(cfg.adapter.model, base=base, num_classes=num_classes, freeze_bn=cfg.base.bn != "adapt")
    plan = pruning_plan(cfg)
    if plan is not None:
        plan.prepare(model)
    return model


def build_datamodule(cfg: DictConfig, split: str):
    """The base (pretraining) or target (adaptation) classes of the configured dataset; reads nothing yet."""
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


def preprocessing(datamodule) -> dict:
    """What an adapter file records to preprocess images as this run evaluated them."""
    return {"image_size": datamodule.image_size, "mean": list(datamodule.mean), "std": list(datamodule.std)}


def build_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers (``logger=[csv,tensorboard]``: both); a tracker whose
    package is missing is one line naming the extra that installs it."""
    loggers = []
    for name, node in tracking.logger_configs(cfg).items():
        tracking.allow_mlflow_file_store(node)
        try:
            loggers.append(instantiate(node))
        except ImportError as exc:  # Lightning raises ModuleNotFoundError naming the package
            raise ConfigError(tracking.missing_package(name, exc)) from None
    return loggers


TRAINER_OPTIONS = ("compile", "channels_last")  # keys of the trainer group that are ours, not Lightning's


def compile_model(model, option) -> None:
    """``trainer.compile``: false, true (``torch.compile``'s default backend, inductor) or a backend name.

    ``nn.Module.compile`` compiles in place: the module tree, its state-dict keys and
    the adapter file stay what they were. Compiling happens at the first batch.
    """
    if option is False or option is None:
        return
    import torch._dynamo  # noqa: PLC0415

    backends = torch._dynamo.list_backends(exclude_tags=())
    if option is not True and option not in backends:
        raise ConfigError(
            f"trainer.compile={option!r} is not a torch.compile backend; use true, false or one of "
            f"{', '.join(backends)}"
        )
    model.compile(**({} if option is True else {"backend": option}))


def make_trainer(cfg: DictConfig, extra_callbacks: list) -> tuple[L.Trainer, RunStats]:
    """Lightning's trainer from ``cfg.trainer``, with the configured callbacks and loggers.

    ``trainer.enable_model_summary`` shows our summary (:class:`bnn_adapt.run.console.MacSummary`:
    binary / fp32 MACs) in place of Lightning's, whose FLOPs read 0 here.
    """
    stats = RunStats()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + extra_callbacks + [stats]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(MacSummary(cfg.data.image_size))
    loggers = build_loggers(cfg)
    # Lightning's arguments, resolved and detached (Hydra 1.4 instantiates a node in its root's context)
    trainer_keys = OmegaConf.to_container(cfg.trainer, resolve=True)
    arguments = OmegaConf.create({k: v for k, v in trainer_keys.items() if k not in (*TRAINER_OPTIONS, "plugins")})
    # checkpoints are written whole or not at all, and read as data only
    plugins = [*(instantiate(p) for p in trainer_keys.get("plugins") or []), CheckpointFiles()]
    try:
        trainer = instantiate(
            arguments, callbacks=callbacks, logger=loggers, plugins=plugins, enable_model_summary=False
        )
    except MisconfigurationException as exc:  # e.g. accelerator=gpu on a machine without one
        raise ConfigError(f"trainer: {exc}") from None
    if trainer.world_size > 1 and cfg.trainer.get("sync_batchnorm") and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm has no CPU implementation; "
            "leave it false on CPU (each process then normalises over its own batch)"
        )
    return trainer, stats


def pretraining_config(cfg: DictConfig) -> DictConfig:
    """The ``task=pretrain`` config that trains the base an adaptation config reads (``base.pretrain``)."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.task = "pretrain"
        sub.trainer.max_epochs = cfg.base.pretrain.epochs
        sub.optimizer.lr = cfg.base.pretrain.lr
        sub.base.save_to = cfg.base.checkpoint
        sub.paths.output_dir = str(Path(cfg.paths.output_dir) / "base_pretrain")
    return sub
