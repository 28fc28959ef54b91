"""Tap cache: run the frozen base once per image and view, then train the
adapter from memory (``tap_cache.enabled=true``, docs/speed.md).

A strategy that declares ``feature_cache`` (a parallel adapter, a new head) reads the frozen base only
through the features it taps (``frozen_features``: the stage outputs, and the base's
pre-classifier vector). With the base frozen in eval mode those features
depend on the image alone, so for a small target set they can be computed
once: ``tap_cache.views=K`` augmented views per training image (K=1: no
augmentation, the eval transform) and one view per validation and test image. Each epoch
then draws one of the K views of every image, seeded by (seed, epoch), and an
epoch costs only the adapter's forward and backward.

Before building, :func:`estimate` states the cache's size; a cache larger
than ``tap_cache.max_gb`` (default: half of the memory then available)
is refused with a :class:`ConfigError` that names what to change. The cache
lives in host memory; Lightning moves each batch to the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bnn_adapt.adapters.strategy import STRATEGIES
from bnn_adapt.errors import ConfigError
from bnn_adapt.training.batches import training_batch_count, without_single_image_batch
from bnn_adapt.training.datamodule import ClassSplitDataModule, ClassSubset

BUILD_BATCH = 256  # images per base forward while building


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class CacheEstimate:
    train_images: int
    views: int
    eval_images: int
    bytes_per_image: int
    limit_bytes: int | None
    limit_reason: str

    @property
    def total_bytes(self) -> int:
        return (self.train_images * self.views + self.eval_images) * self.bytes_per_image

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.total_bytes <= self.limit_bytes

    def describe(self) -> str:
        limit = f"limit {_gb(self.limit_bytes)}: {self.limit_reason}" if self.limit_bytes else "no limit known"
        return (
            f"tap cache: {self.train_images} train images x {self.views} view(s) + {self.eval_images} eval images "
            f"x {self.bytes_per_image / 1e3:,.1f} kB of base features = {_gb(self.total_bytes)} ({limit})"
        )


def feature_bytes_per_image(model, image: torch.Tensor) -> int:
    """Bytes of ``model.frozen_features`` for one image (C, H, W)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        features = model.frozen_features(image.unsqueeze(0).to(device))
    return sum(f[0].numel() * f.element_size() for f in features)


def estimate(model, datamodule: ClassSplitDataModule, views: int = 1, max_gb: float | None = None) -> CacheEstimate:
    """The cache's size for the (set-up) datamodule and the limit it must respect."""
    train, held_out, val = datamodule.train_set, datamodule.eval_set, datamodule.val_set
    if max_gb is not None:
        limit, reason = int(max_gb * 1e9), "tap_cache.max_gb"
    else:
        available = available_memory_bytes()
        limit = available // 2 if available else None
        reason = f"half of the {_gb(available)} available" if available else ""
    with _eval_mode(model):
        per_image = feature_bytes_per_image(model, held_out[0][0])
    return CacheEstimate(len(train), views, len(held_out) + len(val or ()), per_image, limit, reason)


class _eval_mode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class CachedFeatures(Dataset):
    """Features of every (view, image), stored view-major; indexed by lists of flat indices."""

    def __init__(self, features: list[torch.Tensor], labels: torch.Tensor, views: int):
        self.features, self.labels, self.views = features, labels, views
        self.images = len(labels)

    def __len__(self) -> int:
        return self.images

    def __getitem__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return [tuple(f[index] for f in self.features), self.labels[index % self.images]]


class ViewBatches(Sampler[list[int]]):
    """Batches of flat (view, image) indices: images shuffled, one random view
    each; both depend only on (seed, epoch), so a resumed run sees the same batches.
    Training (``shuffle``) leaves out a last batch of one image, as the image loader does."""

    def __init__(self, images: int, views: int, batch_size: int, shuffle: bool, seed: int):
        self.images, self.views, self.batch_size, self.shuffle, self.seed = images, views, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.images, generator=generator) if self.shuffle else torch.arange(self.images)
        view = torch.randint(self.views, (self.images,), generator=generator) if self.views > 1 else 0
        flat = (view * self.images + order).tolist() if self.views > 1 else order.tolist()
        batches = (flat[start : start + self.batch_size] for start in range(0, self.images, self.batch_size))
        return without_single_image_batch(batches, self.batch_size, self) if self.shuffle else batches

    def __len__(self) -> int:
        if self.shuffle:
            return training_batch_count(self.images, self.batch_size, self)
        return -(-self.images // self.batch_size)


def build_features(model, subset: ClassSubset, views: int, device: torch.device, num_workers: int = 0):
    """``views`` passes over ``subset`` through ``model.frozen_features``; host tensors, view-major."""
    batched = getattr(subset, "collate_fn", None)  # decoded images (ImageTensors) come as whole batches
    loader = DataLoader(subset, batch_size=BUILD_BATCH, shuffle=False, num_workers=num_workers, collate_fn=batched)
    n = len(subset)
    store: list[torch.Tensor] | None = None
    labels = torch.as_tensor(subset.labels, dtype=torch.long)
    with _eval_mode(model), torch.no_grad():
        for v in range(views):
            at = v * n
            for images, _ in loader:
                features = model.frozen_features(images.to(device))
                if store is None:
                    store = [torch.empty((views * n, *f.shape[1:]), dtype=f.dtype) for f in features]
                for kept, f in zip(store, features, strict=True):
                    kept[at : at + len(images)] = f.cpu()
                at += len(images)
    return store, labels


class TapCacheDataModule(L.LightningDataModule):
    """Wraps a :class:`ClassSplitDataModule`: same classes, batches of cached base features."""

    def __init__(self, datamodule: ClassSplitDataModule, model, views: int = 1, max_gb: float | None = None):
        super().__init__()
        if not (hasattr(model, "can_cache_features") and model.can_cache_features()):
            strategy = getattr(model, "strategy", type(model).__name__)
            cacheable = ", ".join(name for name, cls in STRATEGIES.items() if cls.feature_cache)
            raise ConfigError(
                f"tap_cache.enabled=true needs a strategy whose gradients never reach a frozen, eval-mode base "
                f"({cacheable}) and base.bn=frozen or recalibrate; adapter={strategy}"
                + ("" if getattr(model, "freeze_bn", True) else " with base.bn=adapt")
                + " cannot use it."
            )
        if views < 1:  # its type is the schema's (bnn_adapt.run.schema.TapCacheSchema)
            raise ConfigError(f"tap_cache.views={views!r} is invalid: it must be a positive integer")
        self.datamodule, self.model, self.views, self.max_gb = datamodule, model, views, max_gb
        self.train_features: CachedFeatures | None = None
        self.val_features: CachedFeatures | None = None
        self.eval_features: CachedFeatures | None = None

    @property
    def val_fraction(self) -> float:
        return self.datamodule.val_fraction

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.datamodule.class_names

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        if self.train_features is not None:
            return
        dm = self.datamodule
        dm.setup(stage)
        size = estimate(self.model, dm, self.views, self.max_gb)
        print(size.describe())
        if not size.fits:
            raise ConfigError(
                f"{size.describe()} does not fit; lower tap_cache.views, data.limit_per_class, "
                "raise tap_cache.max_gb, or set tap_cache.enabled=false"
            )
        device = self._device()
        self.model.to(device)
        started = time.perf_counter()

        def features(part: str, views: int) -> CachedFeatures:
            images, loading = dm.for_device(dm.dataset(part, train=views > 1), device)
            return CachedFeatures(*build_features(self.model, images, views, device, loading["num_workers"]), views)

        self.train_features = features("train", self.views)
        self.eval_features = features("eval", 1)
        self.val_features = self.eval_features if dm.val_set is None else features("val", 1)
        print(f"tap cache built in {time.perf_counter() - started:.1f} s on {device}")

    def _loader(self, features: CachedFeatures | None, shuffle: bool) -> DataLoader:
        if features is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dm = self.datamodule
        batches = ViewBatches(features.images, features.views, dm.batch_size, shuffle, dm.seed)
        return DataLoader(features, batch_size=None, sampler=batches, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_features, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_features, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_features, shuffle=False)
