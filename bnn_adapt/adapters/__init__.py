"""Adaptation strategies and their adapters: plain ``nn.Module``s, usable without Hydra or Lightning.

One module per strategy, holding its adapter and the strategy that wires it to the base
(:class:`~bnn_adapt.adapters.strategy.AdaptedModel`), which registers itself in :data:`STRATEGIES` under its
name. Every module of this package is imported here, so a new strategy's module is found by being in it.
"""

import importlib
import pkgutil

from bnn_adapt.adapters.bitfit import BitFit, BitFitAdapter
from bnn_adapt.adapters.head_only import FullFinetune, HeadOnly
from bnn_adapt.adapters.lora import LoRA, LoRAAdapter, LoRABranch
from bnn_adapt.adapters.serial import Serial, SerialAdapter
from bnn_adapt.adapters.strategy import STRATEGIES, AdaptedModel, resolve_groups
from bnn_adapt.adapters.udta import UDTA, Parallel, ThinBlock

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "STRATEGIES",
    "AdaptedModel",
    "BitFit",
    "BitFitAdapter",
    "FullFinetune",
    "HeadOnly",
    "LoRA",
    "LoRAAdapter",
    "LoRABranch",
    "Parallel",
    "Serial",
    "SerialAdapter",
    "ThinBlock",
    "UDTA",
    "resolve_groups",
]
