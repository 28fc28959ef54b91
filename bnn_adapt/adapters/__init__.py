"""Adapters: plain ``nn.Module``s, usable without Hydra or Lightning."""

from bnn_adapt.adapters.serial import SerialAdapter
from bnn_adapt.adapters.udta import UDTA, ThinBlock

__all__ = ["SerialAdapter", "ThinBlock", "UDTA"]
