"""Frozen binary base networks (and the fp32 ResNet-18 references) and their checkpoints.

Importing this package registers the bases defined here (:data:`BASES`); a base defined elsewhere registers
when its module is imported, which a config naming it in ``base.net._target_`` does."""

from bnn_adapt.bases.base import BASES, BaseNetwork, base_class, rebuild
from bnn_adapt.bases.checkpoint import load_base, save_base
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.resnet import ResNet18, ResNet18CIFAR, ResNetCIFAR
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR

__all__ = [
    "BASES",
    "BaseNetwork",
    "base_class",
    "ReActNet18",
    "ResNet18",
    "ResNet18CIFAR",
    "ResNetCIFAR",
    "STEResNetCIFAR",
    "load_base",
    "rebuild",
    "save_base",
]
