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
    "task": ("pretrain", "adapt", "export", "predict"),
    "base.bn": ("frozen", "adapt"),
    "trainer.memory": ("standard", "lean", "lean_fp16"),
    "export.dtype": ("fp32", "fp16", "int8"),
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
    for key in ("summary_only", "resume", "debug"):
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: use true or false")
    for key in ("optimizer.lr", "base.width"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} is invalid: it must be a positive number")
    check_image_size(cfg)
    for key in ("reduction.rate", "reduction.depthwise_rate", "reduction.pointwise_rate", "reduction.head_rate"):
        value = OmegaConf.select(cfg, key, default=0.0)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value!r} is invalid: a pruning rate must be in [0, 1)")


def check_image_size(cfg: DictConfig) -> None:
    from bnn_adapt.bases import BASES  # noqa: PLC0415 - keeps `import bnn_adapt.config` light

    size, base = OmegaConf.select(cfg, "data.image_size"), BASES.get(OmegaConf.select(cfg, "base.name"))
    smallest = getattr(base, "min_input_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < smallest:
        usual = getattr(base, "input_size", None)
        raise ConfigError(
            f"data.image_size={size!r} is too small for base={cfg.base.name}: it needs at least {smallest} "
            f"pixels (it was designed for {usual})"
        )
