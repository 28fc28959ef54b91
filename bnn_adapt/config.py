"""OmegaConf resolvers used by ``conf/`` and checks run before any work starts."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from bnn_adapt.errors import ConfigError


def classes_tag(classes) -> str:
    """[0, 1, 2, 3, 4] -> '0-4' (a readable file-name part)."""
    if classes is None:
        return "all"
    items = list(classes)
    if items and all(isinstance(c, int) for c in items) and items == list(range(items[0], items[0] + len(items))):
        return f"{items[0]}-{items[-1]}"
    return "_".join(str(c) for c in items)


def register_resolvers() -> None:
    for name, fn in {
        "range": lambda start, stop: list(range(int(start), int(stop))),
        "len": lambda items: len(items) if items is not None else None,
        "classes_tag": classes_tag,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()

CHOICES = {
    "task": ("pretrain", "adapt"),
    "base.bn": ("frozen", "adapt"),
}


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values no constructor checks; raise ConfigError."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid: use one of {', '.join(allowed)}")
    for key in ("trainer.max_epochs", "data.batch_size"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} is invalid: it must be a positive integer")
    for key in ("reduction.rate", "reduction.depthwise_rate", "reduction.pointwise_rate"):
        value = OmegaConf.select(cfg, key, default=0.0)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value!r} is invalid: a pruning rate must be in [0, 1)")
