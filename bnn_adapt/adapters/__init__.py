"""Adapters: plain ``nn.Module``s, usable without Hydra or Lightning."""

from bnn_adapt.adapters.bitfit import BitFitAdapter
from bnn_adapt.adapters.lora import LoRAAdapter, LoRABranch
from bnn_adapt.adapters.serial import SerialAdapter
from bnn_adapt.adapters.udta import UDTA, ThinBlock

__all__ = ["BitFitAdapter", "LoRAAdapter", "LoRABranch", "SerialAdapter", "ThinBlock", "UDTA"]
