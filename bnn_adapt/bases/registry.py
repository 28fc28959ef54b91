"""Every base network by the name configs and checkpoints use (``base.name``, ``arch``)."""

from __future__ import annotations

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.resnet import ResNet18, ResNet18CIFAR, ResNetCIFAR
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR

BASES: dict[str, type[BaseNetwork]] = {
    cls.arch: cls for cls in (STEResNetCIFAR, ReActNet18, ResNetCIFAR, ResNet18CIFAR, ResNet18)
}

#: what a checkpoint written before a constructor argument existed was built with
LEGACY_ARCH_DEFAULTS = {"ste_resnet_cifar": {"block": "binarynet"}}


def rebuild(arch: str, arch_config: dict) -> BaseNetwork:
    """A fresh ``arch`` from the constructor arguments a checkpoint or packed file recorded."""
    return BASES[arch](**{**LEGACY_ARCH_DEFAULTS.get(arch, {}), **arch_config})
