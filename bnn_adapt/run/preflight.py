"""What a run needs that is not there, said before any work starts.

A missing base checkpoint is one line naming the command that makes it (and,
in the same line, the data that command needs when that is missing too). A
base is pretrained automatically (``base.pretrain``) only at its default,
managed place: a path the user gave that does not exist is an error, never a
new base. A multirun checks every job first (:class:`SweepPreflight`, a Hydra
callback in ``conf/hydra/default.yaml``): when none of them can run, it stops
before the first with one line, leaving nothing on disk; as soon as one can,
the sweep goes on (jobs that cannot run fail and are recorded as usual).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from bnn_adapt.bases.base import base_class
from bnn_adapt.errors import CheckpointError, UserError
from bnn_adapt.run import builders
from bnn_adapt.run.config import CONF_DIR, compose, validate

#: override keys that change neither the base nor the data a job needs (the rest are composed to check)
INERT = (
    "adapter",
    "reduction",
    "optimizer",
    "scheduler",
    "trainer",
    "seed",
    "threads",
    "memory",
    "tap_cache",
    "logger",
    "callbacks",
    "resume",
    "debug",
    "export",
    "predict",
    "hydra",
)
#: what a base pretraining command must repeat of an adaptation config to write the base it reads
BASE_SHAPING = (
    "base.width",
    "base.block",
    "base.binarize",
    "data.base_classes",
    "data.image_size",
    "data.root",
    "paths.base_dir",
)


# ----------------------------------------------------------------------------- the base


def managed_checkpoint(cfg: DictConfig) -> bool:
    """Whether ``base.checkpoint`` is the framework's own place for this base: the base config's
    default (an interpolation) under ``paths.base_dir``, not a path the user typed."""
    if not cfg.base.get("checkpoint") or not OmegaConf.is_interpolation(cfg.base, "checkpoint"):
        return False
    return Path(cfg.paths.base_dir).resolve() in Path(cfg.base.checkpoint).resolve().parents


def pretrains_missing_base(cfg: DictConfig) -> bool:
    """Whether an adaptation run pretrains its base first (``base.pretrain``, at the managed place only)."""
    return bool(cfg.base.get("pretrain")) and managed_checkpoint(cfg) and not Path(cfg.base.checkpoint).is_file()


def base_experiment(data_choice: str | None) -> str | None:
    """The ``conf/experiment/*_base.yaml`` that pretrains a base on ``data_choice``'s base classes."""
    for path in sorted((CONF_DIR / "experiment").glob("*_base.yaml")):
        defaults = OmegaConf.load(path).get("defaults") or []
        if any(isinstance(d, DictConfig) and d.get("override /data") == data_choice for d in defaults):
            return path.stem
    return None


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _override(key: str, value: Any) -> str:
    return f"{key}={str(value).replace(' ', '') if isinstance(value, list) else value}"


def pretraining_command(cfg: DictConfig, choices: dict | None) -> str | None:
    """The command that writes the base ``cfg`` reads, checked by composing it; None when none is found."""
    experiment = base_experiment((choices or {}).get("data"))
    if experiment is None:
        return None
    args = [f"+experiment={experiment}"]
    profile = OmegaConf.select(cfg, "profile.name", default=None)
    if profile:
        args.append(f"+profile={profile}")
    try:
        candidate = compose(args)
        args += [_override(k, _value(cfg, k)) for k in BASE_SHAPING if _value(candidate, k) != _value(cfg, k)]
        made = compose(args).base.save_to
    except Exception:  # noqa: BLE001 - a command we cannot confirm is not shown
        return None
    if made is None or Path(made).resolve() != Path(cfg.base.checkpoint).resolve():
        return None
    return "python -m bnn_adapt " + " ".join(args)


def data_hint(cfg: DictConfig) -> str:
    if OmegaConf.select(cfg, "profile.name", default=None) == "smoke":
        return "generate it with `python -m bnn_adapt.thesis.synthetic`"
    return "put the files there or add data.download=true"


def base_problem(cfg: DictConfig, choices: dict | None = None) -> str | None:
    """Why an adaptation run's base can be neither loaded nor pretrained (one line), or None."""
    if cfg.task != "adapt" or cfg.get("summary_only"):
        return None
    checkpoint = cfg.base.get("checkpoint")
    if (checkpoint and Path(checkpoint).is_file()) or pretrains_missing_base(cfg):
        return None
    how = cfg.base.get("how_to_get") or "pass base.checkpoint=PATH"
    command = None
    if not checkpoint:
        line = f"no base checkpoint given (base.checkpoint=null); {how}"
    elif base_class(cfg.base.net._target_).load_released is not None:  # its authors' release, never pretrained here
        line = f"base checkpoint {checkpoint} does not exist; {how}"
    elif not managed_checkpoint(cfg):
        line = (
            f"base.checkpoint={checkpoint} does not exist; check the path, or pretrain a base there first "
            f"(task=pretrain base.save_to={checkpoint}): a missing base is pretrained automatically only at "
            f"its default place under paths.base_dir={cfg.paths.base_dir}"
        )
    else:
        command = pretraining_command(cfg, choices)
        line = f"base checkpoint {checkpoint} does not exist; " + (
            f"pretrain it first with `{command}`" if command else how
        )
    missing = data_missing(cfg, "base" if command else "target")
    return line + (f"; its data is missing too: {missing}; {data_hint(cfg)}" if missing else "")


def data_missing(cfg: DictConfig, split: str) -> str | None:
    """What the dataset lacks on disk for ``split`` (reads no data), or None."""
    try:
        return builders.build_datamodule(cfg, split).missing_files()
    except UserError as exc:
        return str(exc)


def check_base(cfg: DictConfig) -> None:
    """Raise the one-line CheckpointError of :func:`base_problem`, if any (a single run)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else None
    problem = base_problem(cfg, OmegaConf.to_container(choices) if choices is not None else None)
    if problem:
        raise CheckpointError(problem)


# ----------------------------------------------------------------------------- a multirun's jobs


def job_problem(cfg: DictConfig) -> str | None:
    """Why a composed job (Hydra's node included) cannot run, in one line, or None."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if job.get("summary_only") or job.get("task") not in ("adapt", "pretrain"):
        return None
    try:
        validate(job)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices) if "hydra" in cfg else None
        problem = base_problem(job, choices)
        if problem:
            return problem
        split = "base" if job.task == "pretrain" or pretrains_missing_base(job) else "target"
        missing = data_missing(job, split)
        return f"{missing}; {data_hint(job)}" if missing else None
    except UserError as exc:
        return str(exc)


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides as the basic sweeper builds them; None for another sweeper (Optuna:
    its trials are drawn later), whose master config stands for every trial unless it searches
    something that changes the base or the data."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: PLC0415
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    node = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_")):
        searched = [str(k) for k in params]
        return None if any(k.split(".")[0].lstrip("+~") not in INERT for k in searched) else [[]]
    parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *task])
    return BasicSweeper.split_arguments(parsed, None)[0]


class SweepPreflight(Callback):
    """Before a multirun's first job: compose its jobs (one per distinct base- or data-shaping
    override set) until one can run; when none can, stop with one line."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415

        try:
            jobs = job_overrides(config)
            if jobs is None:
                return
            loader = GlobalHydra.instance().config_loader()
            problems: dict[tuple, str] = {}
            for overrides in jobs:
                key = tuple(o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] not in INERT)
                if key in problems:
                    continue
                problem = job_problem(loader.load_sweep_config(config, list(overrides)) if overrides else config)
                if problem is None:
                    return  # a job that can run: the sweep goes on (jobs that cannot fail and are recorded)
                problems[key] = problem
        except Exception as exc:  # noqa: BLE001 - the check must never be why a sweep cannot start
            print(f"note: could not check the jobs before starting ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        kind = "trial" if "optuna" in str(config.hydra.sweeper.get("_target_")).lower() else "job"
        distinct = list(dict.fromkeys(problems.values()))
        reason = distinct[0] + (f" (and {len(distinct) - 1} other problems)" if len(distinct) > 1 else "")
        every = "every trial" if kind == "trial" else f"each of its {len(jobs)} jobs"
        print(
            f"error: this multirun cannot succeed, so it stops before the first {kind}: {every} would fail "
            f"with: {reason}",
            file=sys.stderr,
        )
        sys.exit(2)
