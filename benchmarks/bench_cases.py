"""The benchmark's cases (``make bench``): which base, strategy and memory mode, the
one batch they all train on, a training step, and building a tap cache."""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.nn.layers import clamp_to_unit_, latent_weights
from bnn_adapt.run.config import CONF_DIR, compose
from bnn_adapt.training.lean import set_memory_mode

FIRST_STRATEGIES = ("full_finetune", "head_only", "serial", "udta")  # the thesis's, in table order


@dataclass(frozen=True)
class ModelSetup:
    """One base as benchmarked: its config name, size and the batch it trains on."""

    name: str  # conf/base/<name>.yaml
    width: float
    image_size: int
    batch_size: int
    base_classes: int
    target_classes: int
    pretrain: bool  # also time task=pretrain (training the bare base)


FULL_SETUPS = (
    ModelSetup("ste_resnet_cifar", 1.0, 32, 64, 5, 5, pretrain=True),  # CIFAR-10 5-5
    ModelSetup("reactnet18", 1.0, 224, 16, 1000, 102, pretrain=False),  # ImageNet -> Flowers-102
)
TINY_SETUPS = (
    ModelSetup("ste_resnet_cifar", 0.1, 16, 6, 5, 5, pretrain=True),
    ModelSetup("reactnet18", 0.0625, 32, 4, 10, 5, pretrain=False),
)


@dataclass
class Case:
    setup: ModelSetup
    strategy: str  # a conf/adapter name, or "pretrain" (the bare base, everything trains)
    memory: str
    cache_taps: bool = False
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    inputs: object = field(default=None, repr=False)
    latent: list = field(default_factory=list, repr=False)  # what the step clamps, listed once as training does
    times: list[float] = field(default_factory=list, repr=False)
    build_times: list[float] = field(default_factory=list, repr=False)
    record: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.strategy + (" + tap cache" if self.cache_taps else "")

    @property
    def num_classes(self) -> int:
        return self.setup.base_classes if self.strategy == "pretrain" else self.setup.target_classes


def adapter_names() -> list[str]:
    """Strategies with a config in conf/adapter/, the thesis's first."""
    found = sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml"))
    return [s for s in FIRST_STRATEGIES if s in found] + [s for s in found if s not in FIRST_STRATEGIES]


@functools.cache
def adapter_config(setup: ModelSetup, strategy: str, stages: int):
    """The real config of ``adapter=<strategy>`` with its defaults (g=1, rank 4, ...);
    serial adapters go after every one of the base's ``stages``."""
    overrides = [f"adapter={strategy}", f"base={setup.name}", f"base.width={setup.width}"]
    if strategy == "serial":
        overrides.append(f"adapter.stages=[{','.join(str(s) for s in range(1, stages + 1))}]")
    return compose(overrides).adapter.model


def build_model(setup: ModelSetup, strategy: str, base: nn.Module) -> nn.Module:
    if strategy == "pretrain":
        return base
    from bnn_adapt.run.builders import instantiate  # noqa: PLC0415 - our targets' whitelist (Hydra 1.4)

    config = adapter_config(setup, strategy, len(base.stages))
    return instantiate(config, base=base, num_classes=setup.target_classes, freeze_bn=True)


def make_base(setup: ModelSetup) -> nn.Module:
    from bnn_adapt.bases import BASES

    torch.manual_seed(0)
    return BASES[setup.name](num_classes=setup.base_classes, width=setup.width)


def batch(setup: ModelSetup, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every case of ``setup`` trains on (host memory); its own generators,
    so neither model building nor other cases change it."""
    size = setup.image_size
    images = torch.randn(setup.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, num_classes, (setup.batch_size,), generator=torch.Generator().manual_seed(1))
    return images, labels


def prepare(case: Case, base: nn.Module, device: torch.device) -> None:
    """Build the case's model and optimiser and put its batch on ``device`` (as cached features for the tap cache)."""
    torch.manual_seed(1)
    model = build_model(case.setup, case.strategy, copy.deepcopy(base)).to(device)
    set_memory_mode(model, case.memory)
    model.train()
    images, labels = (t.to(device) for t in batch(case.setup, case.num_classes))
    inputs = images
    if case.cache_taps:
        with torch.no_grad():
            inputs = tuple(t.clone() for t in model.frozen_features(images))
    case.model, case.inputs = model, (inputs, labels)
    case.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    case.latent = latent_weights(model)


def release(case: Case) -> None:
    case.model = case.optimizer = case.inputs = None
    case.latent = []


def train_step(case: Case) -> None:
    inputs, labels = case.inputs
    case.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(case.model(inputs), labels)
    loss.backward()
    case.optimizer.step()
    clamp_to_unit_(case.latent)


class _Images(torch.utils.data.Dataset):
    """The bench batch as a dataset, shaped like the ``ClassSubset`` the tap cache reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def build_cache(case: Case, device: torch.device) -> tuple[float, int]:
    """Build a one-view cache of the case's batch through ``tap_cache.build_features``;
    (seconds, bytes per image)."""
    from bnn_adapt.training.tap_cache import build_features  # Lightning: not needed by memory workers

    images = _Images(*batch(case.setup, case.num_classes))
    sync(device)
    start = time.perf_counter()
    store, _ = build_features(case.model, images, views=1, device=device)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, sum(t[0].numel() * t.element_size() for t in store)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
