"""Class-split image datasets: base classes to pretrain a BNN, disjoint target classes to adapt it.

One datamodule serves either the *base* or the *target* classes of a dataset, with
labels remapped to 0..C-1 in the order given (thesis ch. 5-6: CIFAR 5-5, CIFAR 80-20,
Flowers-102, Pets; SPEC section 5). Files are read with torchvision's dataset
classes; constructing the module reads nothing, ``setup()`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from bnn_adapt.errors import ConfigError, DataError
from bnn_adapt.training.datasets import (
    DATASETS,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LARGE_IMAGE_SIZE,
    DatasetSpec,
    dataset_errors,
    imagefolder_dir,
)


class ClassSubset(Dataset):
    """The samples of the served classes, labelled 0..C-1, transformed on access."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: list[int], transform: Callable):
        self.dataset, self.indices, self.labels, self.transform = dataset, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[self.indices[i]]
        return self.transform(image), self.labels[i]


def _class_list(value: Any, field: str, spec: DatasetSpec) -> list | None:
    """A validated class list: ids in range for built-in sets, folder names (as strings) for imagefolder."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, int)) else list(value)
    if not items:
        raise ConfigError(f"data.{field} is empty; list at least one class or set it to null.")
    if spec.class_names is None:
        classes: list = [str(c) for c in items]
    else:
        n = len(spec.class_names)
        try:
            classes = [int(c) for c in items if not isinstance(c, (bool, float))]
        except ValueError:
            classes = []
        if len(classes) != len(items):
            raise ConfigError(f"data.{field}={items} must be integer class ids 0..{n - 1} for {spec.title}.")
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise ConfigError(
                f"data.{field} has ids {bad} out of range for {spec.title}; valid ids are 0..{n - 1}."
            )
    repeated = sorted({c for c in classes if classes.count(c) > 1}, key=str)
    if repeated:
        raise ConfigError(f"data.{field} lists {repeated} more than once; give each class once.")
    return classes


def _select(labels: Sequence, served: list, limit: int | None) -> tuple[list[int], list[int], list[int]]:
    """Indices of the served classes' samples (the first ``limit`` of each), their new labels, counts."""
    new_label = {c: k for k, c in enumerate(served)}
    counts = [0] * len(served)
    indices, targets = [], []
    for i, label in enumerate(labels):
        k = new_label.get(label)
        if k is None or (limit is not None and counts[k] >= limit):
            continue
        counts[k] += 1
        indices.append(i)
        targets.append(k)
    return indices, targets, counts


def _positive(value: Any, field: str, allow_none: bool = False, minimum: int = 1) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{field}={value!r} must be an integer >= {minimum}.")
    return value


def _stats(value: Any, field: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    stats = tuple(float(v) for v in value)
    if len(stats) != 3 or (field == "normalize_std" and min(stats) <= 0):
        raise ConfigError(f"data.{field}={list(stats)} must be three numbers (R, G, B); a std must be > 0.")
    return stats


class EpochShuffle(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ClassSplitDataModule(L.LightningDataModule):
    """Serves the base or the target classes of one dataset, labels remapped to 0..C-1.

    ``split="base"`` pretrains a backbone on ``base_classes``; ``split="target"`` adapts it
    to ``target_classes`` (None: every class not in ``base_classes``). The eval set (val and
    test loaders) is the dataset's held-out split (SPEC section 5 table).
    """

    def __init__(
        self,
        name: str,
        root: str = "data",
        base_classes: Sequence | None = None,
        target_classes: Sequence | None = None,
        split: str = "target",
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        limit_per_class: int | None = None,
        eval_limit_per_class: int | None = None,
        download: bool = False,
        augment: bool = True,
        normalize_mean: Sequence[float] | None = None,
        normalize_std: Sequence[float] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if name not in DATASETS:
            raise ConfigError(f"data.name={name!r} is unknown; choose one of {', '.join(DATASETS)}.")
        if split not in ("base", "target"):
            raise ConfigError(f"data.split={split!r} must be 'base' (pretraining) or 'target' (adaptation).")
        self.spec = DATASETS[name]
        self.name, self.root, self.split = name, str(root), split
        self.base_classes = _class_list(base_classes, "base_classes", self.spec)
        self.target_classes = _class_list(target_classes, "target_classes", self.spec)
        shared = [c for c in self.target_classes or [] if c in (self.base_classes or [])]
        if shared:
            raise ConfigError(
                f"data.base_classes and data.target_classes share {shared}; the splits must be disjoint."
            )
        if split == "base" and self.base_classes is None:
            raise ConfigError(
                f"data.split=base needs data.base_classes, which {name} leaves unset "
                "(its base is an ImageNet network); set data.split=target or list base classes."
            )
        self.image_size = _positive(image_size, "image_size")
        self.batch_size = _positive(batch_size, "batch_size")
        self.num_workers = _positive(num_workers, "num_workers", minimum=0)
        self.limit_per_class = _positive(limit_per_class, "limit_per_class", allow_none=True)
        self.eval_limit_per_class = _positive(eval_limit_per_class, "eval_limit_per_class", allow_none=True)
        self.download, self.augment, self.seed = bool(download), bool(augment), int(seed)
        self.large = self.spec.large if self.spec.large is not None else self.image_size >= LARGE_IMAGE_SIZE
        default_mean, default_std = (
            (self.spec.mean, self.spec.std) if self.spec.mean else
            (IMAGENET_MEAN, IMAGENET_STD) if self.large else (HALF, HALF)
        )  # fmt: skip
        self.mean = _stats(normalize_mean, "normalize_mean") or default_mean
        self.std = _stats(normalize_std, "normalize_std") or default_std
        self._served: list | None = None
        self.train_set: ClassSubset | None = None
        self.eval_set: ClassSubset | None = None

    # ---- classes

    def served_classes(self) -> list:
        """The served split's classes in label order: dataset ids, or folder names for imagefolder."""
        if self._served is None:
            if self.split == "base":
                self._served = list(self.base_classes)  # type: ignore[arg-type]
            elif self.target_classes is not None:
                self._served = list(self.target_classes)
            else:
                every = self._all_classes()
                self._served = [c for c in every if c not in (self.base_classes or [])]
                if not self._served:
                    raise ConfigError(
                        "data.base_classes covers every class, leaving no target classes; "
                        "list data.target_classes."
                    )
        return self._served

    def _all_classes(self) -> list:
        if self.spec.class_names is not None:
            return list(range(len(self.spec.class_names)))
        folder = imagefolder_dir(self.root, "train")
        problem = f"no class folders under {folder}; add root/train/<class>/ folders or fix data.root"
        with dataset_errors(problem):
            return find_classes(str(folder))[0]

    def missing_files(self) -> str | None:
        """What the dataset lacks on disk, reading no data (None: nothing, or ``download`` fetches it)."""
        return None if self.download else self.spec.missing(self.root)

    @property
    def num_classes(self) -> int:
        return len(self.served_classes())

    @property
    def class_names(self) -> list[str]:
        served = self.served_classes()
        return list(served) if self.spec.class_names is None else [self.spec.class_names[c] for c in served]

    # ---- transforms

    def transform(self, train: bool) -> v2.Compose:
        """Train or eval pipeline: CIFAR/small sets crop(+flip), 224-px sets thesis augmentation."""
        size, augment = self.image_size, train and self.augment
        if self.large and augment:
            geometry = [
                v2.RandomRotation(15),
                v2.RandomResizedCrop(size),
                v2.RandomVerticalFlip(),
                v2.RandomHorizontalFlip(),
            ]
        else:
            geometry = [v2.Resize((size, size))]
            if augment and not self.large:
                geometry.append(v2.RandomCrop(size, padding=size // 8))
                if self.spec.hflip:
                    geometry.append(v2.RandomHorizontalFlip())
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    # ---- Lightning hooks

    def prepare_data(self) -> None:
        """Download once (rank 0) when asked; setup() then finds the files."""
        if self.download:
            self.spec.load(self.root, True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        served = self.served_classes()
        (train, train_labels), (held_out, eval_labels) = self.spec.load(self.root, self.download)
        parts = {}
        for part, dataset, labels, limit in (
            ("train", train, train_labels, self.limit_per_class),
            ("eval", held_out, eval_labels, self.eval_limit_per_class),
        ):
            indices, targets, counts = _select(labels, served, limit)
            empty = [c for c, n in zip(served, counts) if n == 0]
            if empty:
                present = sorted({str(label) for label in labels}, key=lambda s: (len(s), s))
                raise DataError(
                    f"{self.spec.title} has no {part} images of class {empty} under {self.root} "
                    f"(classes present: {', '.join(present)}); fix the class lists or data.root."
                )
            parts[part] = ClassSubset(dataset, indices, targets, self.transform(train=part == "train"))
        self.train_set, self.eval_set = parts["train"], parts["eval"]

    def _loader(self, dataset: ClassSubset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)
