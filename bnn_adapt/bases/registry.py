"""Every base network by the name configs and checkpoints use (``base.name``, ``arch``)."""

from __future__ import annotations

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.resnet import ResNet18, ResNet18CIFAR, ResNetCIFAR
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR

BASES: dict[str, type[BaseNetwork]] = {
    cls.arch: cls for cls in (STEResNetCIFAR, ReActNet18, ResNetCIFAR, ResNet18CIFAR, ResNet18)
}
