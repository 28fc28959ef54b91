"""The config: where it lives, how to compose it, its resolvers and the checks run before any work starts."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from bnn_adapt.errors import ConfigError
from bnn_adapt.run import schema

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"  # conf/config.yaml and its groups
SWEEPS_DIR = REPO_ROOT / "sweeps"  # table sweeps and presets, primary configs that extend conf/config.yaml


def classes_tag(classes) -> str:
    """[0, 1, 2, 3, 4] -> '0-4' (a readable file-name part)."""
    if classes is None:
        return "all"
    items = list(classes)
    if items and all(isinstance(c, int) for c in items) and items == list(range(items[0], items[0] + len(items))):
        return f"{items[0]}-{items[-1]}"
    return "_".join(str(c) for c in items)


def tracking_location(what: str, default=None, *, _root_) -> str | None:
    """``${tracking:WHAT}`` in ``conf/logger/``: where a tracker writes (:mod:`bnn_adapt.run.tracking`).

    ``dir``: the sweep directory in a multirun (its runs share one TensorBoard
    folder, MLflow store, W&B group), else the run directory; ``run``: the run
    directory relative to the sweep directory, else its name; ``group``: the sweep
    directory relative to ``paths.log_dir``, else ``default``.
    """
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    output_dir = Path(_root_.paths.output_dir).absolute()
    sweep = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = Path(HydraConfig.get().sweep.dir).absolute()
        if not output_dir.is_relative_to(sweep):
            sweep = None  # resume=true continues an older run elsewhere: it keeps its own place
    if what == "dir":
        return str(sweep or output_dir)
    if what == "run":
        return str(output_dir.relative_to(sweep)) if sweep else output_dir.name
    if what == "group":
        if sweep is None:
            return default
        log_dir = Path(_root_.paths.log_dir).absolute()
        return str(sweep.relative_to(log_dir)) if sweep.is_relative_to(log_dir) else sweep.name
    raise ConfigError(f"${{tracking:{what}}} is invalid: use dir, run or group")


def register_resolvers() -> None:
    for name, fn in {
        "range": lambda start, stop: list(range(int(start), int(stop))),
        "len": lambda items: len(items) if items is not None else None,
        "classes_tag": classes_tag,
        "tracking": tracking_location,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, fn)


register_resolvers()
schema.register()

TASKS = ("pretrain", "adapt", "export", "predict", "evaluate")
BN_MODES = ("frozen", "recalibrate", "adapt")  # base.bn: recalibrate = AdaBN, then frozen
BASE_EPOCHS = ("last", "best")  # base.epoch: which pretraining epoch adaptation reads


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the keys no constructor checks, each listed once where it is used."""
    from bnn_adapt.adapters.file_codec import DTYPES  # noqa: PLC0415 - keeps `import bnn_adapt.run.config` light
    from bnn_adapt.nn.quantizers import BITS  # noqa: PLC0415
    from bnn_adapt.training.lean import MEMORY_MODES  # noqa: PLC0415

    return {
        "task": TASKS,
        "base.bn": BN_MODES,
        "base.epoch": BASE_EPOCHS,
        "memory": MEMORY_MODES,
        "export.dtype": DTYPES,
        "adapter.bits": BITS,
    }


#: what our configs' ``_target_``s may name (Hydra 1.4's execution whitelist,
#: hydra.cc/docs/advanced/execution_whitelist)
TRUSTED_TARGETS = ("bnn_adapt.*", "lightning.*", "torch.optim.*", "optuna.pruners.*")

#: Hydra's command-line flags that choose what to do (run, show the config, help, ...)
HYDRA_COMMANDS = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-c",
    "--cfg",
    "-r",
    "--run",
    "-m",
    "--multirun",
    "-sc",
    "--shell-completion",
    "-i",
    "--info",
    "--experimental-rerun",
}


def search_as_multirun(args: Sequence[str]) -> list[str]:
    """``hparams_search=NAME`` runs its search as a multirun without ``--multirun``: Hydra 1.4 takes
    ``hydra.mode`` only from the primary config or the command line, no longer from a config group."""
    args = list(args)
    search = any(
        a.partition("=")[0].lstrip("+~") == "hparams_search" and a.partition("=")[2] not in ("", "null") for a in args
    )
    if search and not HYDRA_COMMANDS.intersection(a.partition("=")[0] for a in args):
        return ["--multirun", *args]
    return args


#: keys whose values are paths (or lists of them): run directories are named ``row=...``, which
#: Hydra's override grammar does not take unquoted
PATH_KEYS = (
    "export.adapter_run",
    "evaluate.adapter",
    "adapters",
    "inputs",
    "base.checkpoint",
    "base.file",
    "base.save_to",
    "data.root",
)


def quote_path_overrides(args: Sequence[str]) -> list[str]:
    """Overrides of path keys whose values hold ``=`` (run directories such as ``row=udta_g20``) quoted,
    so that ``export.adapter_run=[outputs/tables/full/table_6_5/row=udta_g20]`` works as typed.

    A value Hydra could not parse anyway is the only one changed. In a list, commas inside a
    directory name (``row=a,seed=2``, or a path through one) are told from separators by what exists on disk.
    ``adapters={name: path, ...}`` (task=predict's named adapters) replaces the default list.
    """
    quoted = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key == "adapters" and value.startswith("{") and value.endswith("}"):  # named adapters, task=predict
            quoted += ["~adapters", f"+adapters={_quoted_dict(value)}"]  # the default is a list: replaced, not merged
            continue
        if not (eq and key.lstrip("+~") in PATH_KEYS and "=" in value and value[:1] not in "'\""):
            quoted.append(arg)
            continue
        if value.startswith("[") and value.endswith("]"):
            items: list[str] = []
            for piece in value[1:-1].split(","):
                continues = ("/" not in piece or Path(f"{items[-1]},{piece}").exists()) if items else False
                if items and not Path(items[-1]).exists() and continues:
                    items[-1] += "," + piece  # part of the previous name
                else:
                    items.append(piece)
            value = "[" + ",".join(_quoted(i) for i in items) + "]"
        else:
            value = _quoted(value)
        quoted.append(f"{key}={value}")
    return quoted


def _quoted_dict(value: str) -> str:
    """``{name: path, ...}`` with its paths that hold ``=`` quoted; a piece without ``:`` continues a path."""
    entries: list[str] = []
    for piece in value[1:-1].split(","):
        if entries and ":" not in piece:
            entries[-1] += "," + piece
        elif piece.strip():
            entries.append(piece)
    pairs = []
    for entry in entries:
        name, _, path = (part.strip() for part in entry.partition(":"))
        pairs.append(f"{name}: {_quoted(path)}" if "=" in path and path[:1] not in "'\"" else f"{name}: {path}")
    return "{" + ", ".join(pairs) + "}"


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"' if "'" in text else f"'{text}'"


# ----------------------------------------------------------------------------- composing


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "config",
    config_dir: Path = CONF_DIR,
    return_hydra_config: bool = False,
    output_dir: str | Path | None = None,
) -> DictConfig:
    """``conf/config.yaml`` (or a sweep of ``sweeps/``) composed with ``overrides``, as ``python -m bnn_adapt`` would.

    With ``output_dir`` the config is that of a job running there (``${hydra:runtime.output_dir}``
    resolves to it), ready for :func:`bnn_adapt.run.task.run` or the builders. Works inside a
    running Hydra app too (a job, a sweep callback), whose own Hydra is set aside meanwhile.
    """
    from hydra import compose as hydra_compose  # noqa: PLC0415
    from hydra import initialize_config_dir  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    searchpath = [f"hydra.searchpath=[file://{CONF_DIR}]"] if Path(config_dir) != CONF_DIR else []
    running = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir)):
            cfg = hydra_compose(
                config_name=config_name,
                overrides=[*searchpath, *quote_path_overrides(overrides)],
                return_hydra_config=return_hydra_config or output_dir is not None,
            )
    finally:
        if running is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(running)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
        HydraConfig().set_config(cfg)
    return cfg


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


# ----------------------------------------------------------------------------- checks


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values no constructor checks (their types are the schemas', :mod:`bnn_adapt.run.schema`);
    raise ConfigError."""
    for key, allowed in choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid: use one of {', '.join(map(str, allowed))}")
    for key in ("trainer.max_epochs", "data.batch_size", "base.precise_bn.batches"):
        value = OmegaConf.select(cfg, key, default=1 if key.startswith("base.precise_bn") else None)
        if value is None or value < 1:
            raise ConfigError(f"{key}={value!r} is invalid: it must be a positive integer")
    for key in ("resume", "summary_only", "debug"):  # the root config's own keys have no schema
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: use true or false")
    lr = OmegaConf.select(cfg, "optimizer.lr")  # the optimizer node has no schema
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: it must be a positive number")
    if cfg.base.width <= 0:
        raise ConfigError(f"base.width={cfg.base.width!r} is invalid: it must be a positive number")
    check_image_size(cfg)
    threads = OmegaConf.select(cfg, "threads", default=None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(
            f"threads={threads!r} is invalid: give a positive number of torch threads, or null for "
            "torch's own choice (OMP_NUM_THREADS, else one per core)"
        )
    for key in ("reduction.rate", "reduction.depthwise_rate", "reduction.pointwise_rate", "reduction.head_rate"):
        value = OmegaConf.select(cfg, key, default=0.0)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value!r} is invalid: a pruning rate must be in [0, 1)")


def check_image_size(cfg: DictConfig) -> None:
    from bnn_adapt.bases.base import base_class  # noqa: PLC0415 - keeps `import bnn_adapt.run.config` light

    target = OmegaConf.select(cfg, "base.net._target_")
    size, base = OmegaConf.select(cfg, "data.image_size"), base_class(target) if target else None
    smallest = getattr(base, "min_input_size", 1)
    if size < smallest:
        usual = getattr(base, "input_size", None)
        raise ConfigError(
            f"data.image_size={size!r} is too small for base={cfg.base.name}: it needs at least {smallest} "
            f"pixels (it was designed for {usual})"
        )
