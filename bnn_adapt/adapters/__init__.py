"""Adaptation strategies and their adapters: plain ``nn.Module``s, usable without Hydra or Lightning.

One module per strategy, holding its adapter and the strategy that wires it to
the base (:class:`~bnn_adapt.adapters.strategy.AdaptedModel`):

==============  ==========================  ===============================
``strategy``    module                      adapter
==============  ==========================  ===============================
head_only       :mod:`.head_only`           none (a new head)
full_finetune   :mod:`.head_only`           none (everything trains)
serial          :mod:`.serial`              :class:`SerialAdapter`
udta            :mod:`.udta`                :class:`UDTA` of :class:`ThinBlock`
lora            :mod:`.lora`                :class:`LoRAAdapter`
bitfit          :mod:`.bitfit`              :class:`BitFitAdapter`
==============  ==========================  ===============================
"""

from bnn_adapt.adapters.bitfit import BitFit, BitFitAdapter
from bnn_adapt.adapters.head_only import FullFinetune, HeadOnly
from bnn_adapt.adapters.lora import LoRA, LoRAAdapter, LoRABranch
from bnn_adapt.adapters.serial import Serial, SerialAdapter
from bnn_adapt.adapters.strategy import AdaptedModel, resolve_groups
from bnn_adapt.adapters.udta import UDTA, Parallel, ThinBlock

#: every strategy by its config name (``adapter.name``, an adapter file's ``strategy``)
STRATEGIES: dict[str, type[AdaptedModel]] = {
    cls.strategy: cls for cls in (HeadOnly, FullFinetune, Serial, Parallel, LoRA, BitFit)
}

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
