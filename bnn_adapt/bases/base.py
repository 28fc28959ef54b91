"""What every frozen base network offers the adapters.

A base is a stem, a list of stages whose outputs adapters may tap, a
pre-classifier (pooling to a vector) and a classifier. Adapters only use this
interface, so a new base needs no change elsewhere: defining a subclass with its
``arch`` registers it under that name (:data:`BASES`), as PEFT's methods register
where they are defined.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from bnn_adapt.errors import ConfigError

#: every base network by the name configs and checkpoints use (``base.name``, ``arch``), filled as they are defined
BASES: dict[str, type[BaseNetwork]] = {}


def scaled(channels: int, width: float) -> int:
    """A layer's channels at width multiplier ``width`` (at least one)."""
    return max(1, int(round(channels * width)))


class BaseNetwork(nn.Module):
    """What a base declares about itself; the rest of the code asks it, never tests its name."""

    #: output channels of each stage (taps f1..fS)
    stage_channels: list[int]
    #: expected input side length in pixels, and the smallest that works
    input_size: int
    min_input_size: int
    #: name used in configs and checkpoints
    arch: str
    #: BatchNorms whose output only ever reaches a sign function, whatever adapter runs: a packed
    #: base stores each as an exact per-channel threshold (:mod:`bnn_adapt.bases.fingerprint`)
    sign_only_norms: tuple[str, ...] = ()
    #: the range a received file may declare for each constructor argument (:mod:`bnn_adapt.bases.received`):
    #: larger networks are no base anyone trains, and checking before building keeps an edited number from
    #: allocating gigabytes
    arch_limits: ClassVar[dict[str, tuple[float, float]]] = {"num_classes": (1, 100_000), "width": (0.01, 4.0)}
    #: the reader of the checkpoint its authors released in their own format, called as
    #: ``load_released(path, num_classes=..., width=...)``; None: it is pretrained here (``task=pretrain``).
    #: A released base is never pretrained here, and its checkpoint has no best epoch beside it
    load_released: ClassVar[Callable[..., BaseNetwork] | None] = None
    #: the reader of checkpoints another code base wrote for this architecture, called as
    #: ``load_foreign(payload, path)`` on a file without bnn_adapt's ``arch``: the base, or None when the
    #: file is not in its format
    load_foreign: ClassVar[Callable[[object, str], BaseNetwork | None] | None] = None

    stem: nn.Module
    stages: nn.ModuleList
    classifier: nn.Module

    num_classes: int
    width: float

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "arch" in cls.__dict__:
            BASES[cls.arch] = cls

    def pre_classifier(self, last_stage_output: torch.Tensor) -> torch.Tensor:
        """Stage-S output -> the vector the classifier reads (ResNet's: global average pool)."""
        return last_stage_output.mean(dim=(2, 3))

    def new_head(self, in_features: int, num_classes: int) -> nn.Module:
        """A fresh classifier of this base's kind (ResNet's: an fp32 linear with bias)."""
        return nn.Linear(in_features, num_classes)

    def arch_config(self) -> dict:
        """Constructor arguments, stored in checkpoints and exports."""
        return {"num_classes": self.num_classes, "width": self.width}

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All stage outputs f1..fS (real-valued; never binarised in place)."""
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_classifier(self.stage_outputs(x)[-1]))


def rebuild(arch: str, arch_config: dict) -> BaseNetwork:
    """A fresh ``arch`` from the constructor arguments a checkpoint or packed file recorded."""
    return BASES[arch](**arch_config)


def base_class(target: str) -> type[BaseNetwork]:
    """The base network a config's ``base.net._target_`` names, imported (which registers it); only a
    :class:`BaseNetwork` is accepted, so a config builds a base from any module on the path and nothing else."""
    module, _, name = str(target).rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError as exc:
        raise ConfigError(
            f"base.net._target_={target} cannot be imported ({exc}); put its module on the path"
        ) from None
    if not (isinstance(found, type) and issubclass(found, BaseNetwork)):
        raise ConfigError(f"base.net._target_={target} is not a BaseNetwork subclass; name the class of a base")
    return found
