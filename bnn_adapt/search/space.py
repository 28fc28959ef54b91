"""What the size-vs-accuracy search may propose on the configured base: the group counts its adapters can run.

Every 1x1 conv the search's adapters build (a residual adapter's C->C conv after a stage, a thin block's
c_in->c_out pointwise conv) splits its channels into ``adapter.groups`` equal groups, so the values worth
proposing follow the base. By default (``search.groups: null``) they are the thesis's 1, 2, 5, 10 and 20
(its tables 6.3 and 6.5, for the STE ResNet at full width: 80/160/320 channels) where every such conv can
run them, topped up with the powers of two that can while fewer than four do (ReActNet-18's 64 to 512
channels, and the STE ResNet's 8/16/32 at width 0.1: 1, 2, 4, 8), and ``channels``
(one group per input channel), which every base runs. ``search.groups: [...]`` names them instead. Each
value is tried on the meta device (shapes only) with every strategy the search proposes, so that a value
the base cannot run stops the search before its first trial with one line naming the values it can, and
no trial is ever proposed that could not be built.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from omegaconf import DictConfig, OmegaConf

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.bases import BASES
from bnn_adapt.errors import ConfigError

THESIS_GROUPS = (1, 2, 5, 10, 20)
FEWEST, MOST = 4, 5  # numeric choices: below FEWEST, powers of two join the thesis's values, up to MOST
GROUPS = "adapter.groups"


def sweeper_choices(cfg: DictConfig, key: str) -> list | None:
    """The values the Optuna sweeper searches for ``key``: from the command line (a sweep override such as
    ``adapter.groups=choice(1,2)``, which wins) or ``hydra.sweeper.params``; None: not searched."""
    given = [f"{k}={v}" for k, v in (OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}).items()]
    given += list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])
    parser, found = OverridesParser.create(), None
    for override in parser.parse_overrides([g for g in given if g.partition("=")[0].lstrip("+~") == key]):
        value = override.value()
        found = list(value.list) if isinstance(value, ChoiceSweep) else [value]
    return found


def _arguments(cfg: DictConfig) -> tuple[str, tuple]:
    """The base's name and constructor arguments (hashable), as ``base.net`` configures them."""
    net = OmegaConf.to_container(cfg.base.net, resolve=True) if OmegaConf.select(cfg, "base.net") else {}
    net = {k: v for k, v in net.items() if k != "_target_"}
    net.setdefault("width", OmegaConf.select(cfg, "base.width", default=1.0))
    return str(cfg.base.name), tuple(sorted(net.items()))


@functools.lru_cache(maxsize=16)
def _stage_channels(base_name: str, arguments: tuple) -> tuple[int, ...]:
    with torch.device("meta"):
        return tuple(BASES[base_name](**dict(arguments)).stage_channels)


@functools.lru_cache(maxsize=256)
def _runs(base_name: str, arguments: tuple, strategy: str, groups: int | str) -> bool:
    """Whether ``strategy`` with ``adapter.groups=groups`` can be built on that base (on the meta device)."""
    with torch.device("meta"):
        base = BASES[base_name](**dict(arguments))
        try:
            STRATEGIES[strategy](base, 2, groups=groups)
        except ConfigError:
            return False
    return True


def _grouped_strategies(cfg: DictConfig) -> list[str]:
    """The strategies the search proposes whose adapters have grouped convs (an ``adapter.groups`` option)."""
    proposed = sweeper_choices(cfg, "adapter") or [OmegaConf.select(cfg, "adapter.name")]
    grouped = {name for name, cls in STRATEGIES.items() if "groups" in options_of(cls)}
    return [s for s in map(str, proposed) if s in grouped]


def options_of(cls) -> set[str]:
    """The option names a strategy's adapter files record."""
    return {f.name for f in dataclasses.fields(cls.options_class)} if cls.options_class else set()


def runnable(cfg: DictConfig, groups: int | str) -> bool:
    """Whether every grouped strategy the search proposes can run ``adapter.groups=groups`` on the base."""
    base_name, arguments = _arguments(cfg)
    return all(_runs(base_name, arguments, s, groups) for s in _grouped_strategies(cfg))


def runnable_groups(cfg: DictConfig) -> list[int | str]:
    """Every group count up to the base's widest stage that the search's adapters can run, and ``channels``."""
    widest = max(_stage_channels(*_arguments(cfg)))
    return [g for g in range(1, widest + 1) if runnable(cfg, g)] + ["channels"]


def group_choices(cfg: DictConfig) -> list[int | str]:
    """What the search proposes for ``adapter.groups`` (the module docstring): ``search.groups`` as given, or
    the thesis's values this base runs, topped up with powers of two, and ``channels``."""
    given = OmegaConf.select(cfg, "search.groups", default=None)
    if given is not None:
        return list(given)
    valid = [g for g in THESIS_GROUPS if runnable(cfg, g)]
    powers = [2**k for k in range(1, max(_stage_channels(*_arguments(cfg))).bit_length())]
    for power in powers:
        if len(valid) >= FEWEST:
            break
        if power not in valid and runnable(cfg, power):
            valid.append(power)
    return sorted(valid)[:MOST] + ["channels"]


def check_search_space(cfg: DictConfig) -> None:
    """Before the first trial: every ``adapter.groups`` value the search can propose runs on this base,
    else one :class:`ConfigError` line naming the values that do."""
    if not _grouped_strategies(cfg):
        return
    static = sweeper_choices(cfg, GROUPS)
    given = OmegaConf.select(cfg, "search.groups", default=None)
    if static is not None and given is not None:
        raise ConfigError(f"both search.groups and hydra.sweeper.params.{GROUPS} set the groups to search: keep one")
    where, values = (f"hydra.sweeper.params.{GROUPS}", static) if static is not None else ("search.groups", given)
    if values is None:
        return  # derived from the base: runnable by construction
    bad = [v for v in values if not runnable(cfg, v)]
    if bad:
        channels = _stage_channels(*_arguments(cfg))
        strategies = " and ".join(_grouped_strategies(cfg))
        raise ConfigError(
            f"{where} offers {', '.join(map(str, bad))}, which {strategies} adapters cannot run on "
            f"{cfg.base.name} at width {cfg.base.width} (stage channels {'/'.join(map(str, channels))}); "
            f"it can run {', '.join(map(str, runnable_groups(cfg)))}"
        )


def suggest_groups(cfg: DictConfig, trial) -> None:
    """The hook's part: propose ``adapter.groups`` from :func:`group_choices`, unless the sweeper sets it
    (a custom space, a sweep or one value on the command line: checked by :func:`check_search_space`)."""
    if GROUPS in trial.params or GROUPS in trial.user_attrs or not _grouped_strategies(cfg):
        return
    trial.suggest_categorical(GROUPS, group_choices(cfg))
