"""What every adaptation strategy is: a frozen base, an optional adapter and a new head.

Each strategy is a plain ``nn.Module`` (usable in a notebook without Hydra or
Lightning) exposing ``base``, ``adapter`` (or ``None``) and ``head``, built
from ``(base, num_classes, **options)``; ``options`` (a small dataclass, as
PEFT's adapter configs) is what an adapter file records to rebuild it. All but
full finetuning freeze the base; with ``freeze_bn=True`` the base's BN layers
also keep their running statistics (the thesis let them drift: use
``freeze_bn=False`` to reproduce that, docs/thesis.md; ``base.bn=recalibrate``
re-estimates them on the target data first, :mod:`bnn_adapt.training.precise_bn`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.errors import ConfigError
from bnn_adapt.nn.layers import ColumnPrunedLinear, quantize_weights
from bnn_adapt.nn.quantizers import check_bits


def divisors_of_all(*numbers: int) -> list[int]:
    return [d for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)]


def resolve_groups(groups: int | str, c_in: int, c_out: int) -> int:
    """``groups`` as configured (an int, ``"channels"`` = one group per input
    channel, or None = ungrouped) -> a value valid for a c_in -> c_out 1x1 conv."""
    value = 1 if groups is None else c_in if groups == "channels" else groups
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or c_in % value or c_out % value:
        raise ConfigError(
            f"adapter.groups={groups!r} does not divide a {c_in}->{c_out} channel 1x1 conv; "
            f"valid values: {divisors_of_all(c_in, c_out)} or 'channels'"
        )
    return value


def chosen_stages(stages, n: int) -> list[int]:
    """``adapter.stages`` (1-based; null = every stage) as a sorted list, checked against the base."""
    chosen = list(range(1, n + 1)) if stages is None else sorted({int(s) for s in stages})
    if not chosen or any(s < 1 or s > n for s in chosen):
        raise ConfigError(f"adapter.stages={list(stages)} is invalid: this base has stages 1..{n}")
    return chosen


#: every strategy by its config name (``adapter.name``, an adapter file's ``strategy``); each registers itself
STRATEGIES: dict[str, type[AdaptedModel]] = {}


class AdaptedModel(nn.Module):
    """Base + optional adapter + new head for ``num_classes`` target classes.

    A subclass declares everything the rest of the package asks of a strategy (its class attributes and the
    methods below) and registers itself in :data:`STRATEGIES` under its ``strategy`` name when defined.
    """

    strategy: str
    #: the options dataclass ``options`` comes from (None: no options): an adapter file's options are its fields
    options_class: type | None = None
    #: every base parameter trains (and a deployed task needs a whole new base, thesis 6.1); lean training
    #: then keeps the stored activations a binary network's own training needs
    trains_base = False
    #: reads the base only through ``frozen_features`` (its stage outputs), so a tap cache can stand in for it
    feature_cache = False
    #: its output is binarised again downstream, so fp16/int8 rounding on export can flip signs
    sign_sensitive = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "strategy" in cls.__dict__:
            STRATEGIES[cls.strategy] = cls

    @classmethod
    def describe(cls, options: dict) -> str:
        """A run's label from its ``adapter`` config, before the parts every strategy shares (groups,
        pruning, bits): tables, reports and exported file names show it."""
        return cls.strategy

    @classmethod
    def search_stages(cls, n_stages: int) -> list[list[int]]:
        """The ``adapter.stages`` a size-vs-accuracy search chooses among on a base of ``n_stages`` stages
        (none: the strategy has no placements to search)."""
        return []

    def norm_pairs(self) -> dict[str, tuple[str, nn.Module]]:
        """The adapter's copies of base BN affine pairs: ``{weight key: (bias key, the base's BN)}``, keys in the
        adapter's state dict. An adapter file stores each pair folded with that BN's running statistics."""
        return {}

    def kept_rows(self) -> dict[str, torch.Tensor]:
        """Kept-row masks by module name within the adapter: an adapter file stores only those rows (and
        their BN's) of a pruned module."""
        return {}

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True):
        super().__init__()
        self.base = base
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        self.adapter: nn.Module | None = None
        self.config = None  # a strategy's options dataclass, where it has options
        self.pruned = False  # set by a PruningPlan: the adapter's prune targets count their non-zeros
        self.bits = 32  # adapter.bits: the width its conv and linear weights train and are stored at
        if not self.trains_base:
            base.requires_grad_(False)

    @property
    def options(self) -> dict:
        """Constructor arguments beyond (base, num_classes, freeze_bn): an adapter file rebuilds from them."""
        return {} if self.config is None else dataclasses.asdict(self.config)

    def train_at_bits(self, bits: int) -> None:
        """``adapter.bits``: the adapter's and the new head's plain fp32 conv and linear weights train
        quantisation-aware at ``bits`` bits from now on (:func:`~bnn_adapt.nn.layers.quantize_weights`);
        binary layers, BN parameters and biases keep their own precision. Strategies call it last."""
        self.bits = check_bits(bits)
        if self.adapter is not None:
            self.adapter = quantize_weights(self.adapter, self.bits)
        self.head = quantize_weights(self.head, self.bits)

    def base_frozen_in_eval(self) -> bool:
        return not self.trains_base and self.freeze_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if self.base_frozen_in_eval():
            self.base.eval()
        return self

    def introduced_modules(self) -> dict[str, list[nn.Module]]:
        """What this task adds on top of the stored base (for size accounting)."""
        return {"adapter": [self.adapter] if self.adapter is not None else [], "head": [self.head]}

    def prune_targets(self) -> tuple[list[nn.Conv2d], list[nn.Conv2d]]:
        """(depthwise convs, pointwise convs) of the adapter, for pruning."""
        depthwise, pointwise = [], []
        if self.adapter is not None:
            for m in self.adapter.modules():
                if isinstance(m, nn.Conv2d):
                    is_depthwise = m.groups == m.in_channels and m.kernel_size != (1, 1)
                    (depthwise if is_depthwise else pointwise).append(m)
        return depthwise, pointwise

    def base_context(self):
        """No autograd through the base when nothing in it can learn."""
        return contextlib.nullcontext() if self.trains_base else torch.no_grad()

    def can_cache_features(self) -> bool:
        """Whether ``frozen_features`` may be computed once and reused (adapter.cache_taps):
        the base neither learns nor updates BN statistics."""
        return self.feature_cache and self.base_frozen_in_eval()


@contextlib.contextmanager
def substituted(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Within this block, ``module``'s parameters/buffers named in ``tensors`` are those tensors.

    Like ``torch.func.functional_call`` for an arbitrary method: the stored
    objects go back afterwards, and autograd reaches the substitutes.
    """
    saved = []
    try:
        for name, value in tensors.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            store = owner._parameters if attr in owner._parameters else owner._buffers
            if attr not in store:
                raise KeyError(f"{name} is neither a parameter nor a buffer of {type(module).__name__}")
            saved.append((store, attr, store[attr]))
            store[attr] = value
        yield
    finally:
        for store, attr, original in reversed(saved):
            store[attr] = original


def head_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the first linear layer of ``model.head``."""
    if isinstance(model.head, (nn.Linear, ColumnPrunedLinear)):
        return model, "head"
    for name, child in model.head.named_children():
        if isinstance(child, (nn.Linear, ColumnPrunedLinear)):
            return model.head, name
    raise TypeError(f"no linear layer in the head {model.head}")


def make_head_prunable(model: nn.Module) -> ColumnPrunedLinear:
    """Swap the head's linear layer for a :class:`ColumnPrunedLinear` (in place, idempotent)."""
    parent, attr = head_linear(model)
    layer = getattr(parent, attr)
    if not isinstance(layer, ColumnPrunedLinear):
        layer = ColumnPrunedLinear.wrap(layer)
        setattr(parent, attr, layer)
    return layer
