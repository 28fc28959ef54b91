"""Frozen binary base networks (and the fp32 ResNet-18 references) and their checkpoints."""

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.checkpoint import load_base, rebuild, save_base
from bnn_adapt.bases.reactnet import ReActNet18
from bnn_adapt.bases.registry import BASES
from bnn_adapt.bases.resnet import ResNet18, ResNet18CIFAR, ResNetCIFAR
from bnn_adapt.bases.ste_resnet import STEResNetCIFAR

__all__ = [
    "BASES",
    "BaseNetwork",
    "ReActNet18",
    "ResNet18",
    "ResNet18CIFAR",
    "ResNetCIFAR",
    "STEResNetCIFAR",
    "load_base",
    "rebuild",
    "save_base",
]
