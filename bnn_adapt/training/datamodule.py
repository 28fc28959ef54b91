"""Class-split image datasets: base classes to pretrain a BNN, disjoint target classes to adapt it.

One datamodule serves either the *base* or the *target* classes of a dataset, with
labels remapped to 0..C-1 in the order given (thesis ch. 5-6: CIFAR 5-5, CIFAR 80-20,
Flowers-102, Pets). Each dataset's own module reads its files
(:mod:`bnn_adapt.training.datasets`); constructing the module reads nothing, ``setup()`` does.

Small images (at most ``TENSOR_MAX_SIZE`` px, not the 224-px pipeline) are decoded once into
tensors and augmented a batch at a time on the training device (:mod:`.image_tensors`); large
ones go through the per-image pipeline (:meth:`ClassSplitDataModule.transform`) in DataLoader
workers. ``val_fraction`` carves a validation split out of the training images; without one,
every epoch is evaluated on the held-out split, the thesis's protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import suggested_max_num_workers
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from bnn_adapt.errors import ConfigError, DataError
from bnn_adapt.training.batches import EpochShuffle, TrainingBatches
from bnn_adapt.training.datasets import LARGE_IMAGE_SIZE, DatasetSpec, find
from bnn_adapt.training.image_tensors import TENSOR_MAX_SIZE, BatchTransform, ImageTensors, decode

VAL_SPLIT_SEED = 0  # fixed, so every run of a config validates on the same images whatever its seed
ON_DEVICE_SHARE = 0.25  # data.on_device=auto: images held on a GPU when they take at most this share of its free memory


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
    """A validated class list: ids in range for a dataset with named classes, else class names (as strings)."""
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
            raise ConfigError(f"data.{field} has ids {bad} out of range for {spec.title}; valid ids are 0..{n - 1}.")
    repeated = sorted({c for c in classes if classes.count(c) > 1}, key=str)
    if repeated:
        raise ConfigError(f"data.{field} lists {repeated} more than once; give each class once.")
    return classes


def _select(labels: Sequence, served: list) -> tuple[list[int], list[int]]:
    """Indices of the served classes' samples, in dataset order, and their new labels 0..C-1."""
    new_label = {c: k for k, c in enumerate(served)}
    pairs = [(i, new_label[label]) for i, label in enumerate(labels) if label in new_label]
    return [i for i, _ in pairs], [k for _, k in pairs]


def _first_per_class(indices: list[int], targets: list[int], limit: int | None) -> tuple[list[int], list[int]]:
    """The first ``limit`` samples of each class (all with None), in the given order."""
    if limit is None:
        return indices, targets
    counts: dict[int, int] = {}
    kept = []
    for i, k in zip(indices, targets, strict=True):
        counts[k] = counts.get(k, 0) + 1
        if counts[k] <= limit:
            kept.append((i, k))
    return [i for i, _ in kept], [k for _, k in kept]


def _validation_split(
    indices: list[int], targets: list[int], fraction: float
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """(train, validation): ``fraction`` of each class's samples, drawn with ``VAL_SPLIT_SEED``, each in
    dataset order."""
    try:
        train, val = train_test_split(
            np.arange(len(indices)), test_size=fraction, stratify=targets, random_state=VAL_SPLIT_SEED
        )
    except ValueError as err:  # too few images for a class on one side
        raise ConfigError(
            f"data.val_fraction={fraction} cannot split {len(indices)} training images of "
            f"{len(set(targets))} classes ({err}); use a larger fraction or more images."
        ) from None

    def rows(chosen: np.ndarray) -> tuple[list[int], list[int]]:
        return [indices[j] for j in sorted(chosen)], [targets[j] for j in sorted(chosen)]

    return rows(train), rows(val)


def _positive(value: Any, field: str, allow_none: bool = False, minimum: int = 1) -> Any:
    if value is None and allow_none:
        return None
    if value < minimum:  # its type is the schema's (bnn_adapt.run.schema.DataSchema)
        raise ConfigError(f"data.{field}={value!r} must be an integer >= {minimum}.")
    return value


def _stats(value: Any, field: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    stats = tuple(float(v) for v in value)
    if len(stats) != 3 or (field == "normalize_std" and min(stats) <= 0):
        raise ConfigError(f"data.{field}={list(stats)} must be three numbers (R, G, B); a std must be > 0.")
    return stats


class ClassSplitDataModule(L.LightningDataModule):
    """Serves the base or the target classes of one dataset, labels remapped to 0..C-1.

    ``split="base"`` pretrains a backbone on ``base_classes``; ``split="target"`` adapts it
    to ``target_classes`` (None: every class not in ``base_classes``). The test loader serves
    the dataset's held-out split (``eval_set``); the val loader serves
    ``val_set``, ``val_fraction`` of the training images of each class (before
    ``limit_per_class``; a fixed draw, ``VAL_SPLIT_SEED``), or with ``val_fraction=0`` the
    held-out split too, as the thesis validated. ``eval_limit_per_class`` limits both.

    ``on_device`` (small images): keep the decoded images on the training GPU (``auto``: when
    they take at most ``ON_DEVICE_SHARE`` of its free memory); batches are augmented on that
    device either way. ``num_workers`` (per-image pipeline; None: Lightning's suggestion on a
    GPU, none on the CPU), pinned memory on a GPU, persistent workers.
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
        num_workers: int | None = None,
        limit_per_class: int | None = None,
        eval_limit_per_class: int | None = None,
        download: bool = False,
        augment: bool = True,
        normalize_mean: Sequence[float] | None = None,
        normalize_std: Sequence[float] | None = None,
        seed: int = 0,
        val_fraction: float = 0.0,
        on_device: bool | str = "auto",
    ):
        super().__init__()
        if split not in ("base", "target"):
            raise ConfigError(f"data.split={split!r} must be 'base' (pretraining) or 'target' (adaptation).")
        self.spec = find(name)
        self.name, self.root, self.split = name, str(root), split
        self.base_classes = _class_list(base_classes, "base_classes", self.spec)
        self.target_classes = _class_list(target_classes, "target_classes", self.spec)
        shared = [c for c in self.target_classes or [] if c in (self.base_classes or [])]
        if shared:
            raise ConfigError(f"data.base_classes and data.target_classes share {shared}; the splits must be disjoint.")
        if split == "base" and self.base_classes is None:
            raise ConfigError(
                f"data.split=base needs data.base_classes, which {name} leaves unset "
                "(its base is an ImageNet network); set data.split=target or list base classes."
            )
        self.image_size = _positive(image_size, "image_size")
        self.batch_size = _positive(batch_size, "batch_size")
        self.num_workers = _positive(num_workers, "num_workers", allow_none=True, minimum=0)
        self.limit_per_class = _positive(limit_per_class, "limit_per_class", allow_none=True)
        self.eval_limit_per_class = _positive(eval_limit_per_class, "eval_limit_per_class", allow_none=True)
        self.download, self.augment, self.seed = bool(download), bool(augment), int(seed)
        self.large = self.spec.large if self.spec.large is not None else self.image_size >= LARGE_IMAGE_SIZE
        default_mean, default_std = self.spec.statistics(self.large)
        self.mean = _stats(normalize_mean, "normalize_mean") or default_mean
        self.std = _stats(normalize_std, "normalize_std") or default_std
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction!r} must be a number in [0, 1) (0: no split).")
        self.val_fraction = float(val_fraction)
        if on_device not in (True, False, "auto"):
            raise ConfigError(f"data.on_device={on_device!r} must be true, false or auto.")
        self.on_device = on_device
        self.as_tensors = not self.large and self.image_size <= TENSOR_MAX_SIZE
        self._served: list | None = None
        self.train_set: ClassSubset | ImageTensors | None = None
        self.val_set: ClassSubset | ImageTensors | None = None  # None: validated on eval_set
        self.eval_set: ClassSubset | ImageTensors | None = None

    # ---- classes

    def served_classes(self) -> list:
        """The served split's classes in label order: dataset ids, or the class names found on disk."""
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
                        "data.base_classes covers every class, leaving no target classes; list data.target_classes."
                    )
        return self._served

    def _all_classes(self) -> list:
        if self.spec.class_names is not None:
            return list(range(len(self.spec.class_names)))
        return self.spec.classes_on_disk(self.root)  # type: ignore[misc]

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
        """Per-image train or eval pipeline: CIFAR/small sets crop(+flip), 224-px sets thesis augmentation."""
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

    def batch_transform(self, train: bool) -> BatchTransform:
        """The tensor pipeline's equivalent of :meth:`transform` for small images."""
        augment = train and self.augment
        padding = self.image_size // 8 if augment else 0
        return BatchTransform(self.mean, self.std, padding=padding, hflip=augment and self.spec.hflip)

    def dataset(self, part: str, train: bool) -> ClassSubset | ImageTensors:
        """The set-up ``part`` (``train``, ``val``, ``eval``) under the train or eval transform
        (the tap cache's views); the images are shared, not copied."""
        served = {"train": self.train_set, "val": self.val_set, "eval": self.eval_set}[part]
        if served is None:
            raise RuntimeError(f"no {part} split; call setup() first" + (" (with val_fraction)" * (part == "val")))
        if isinstance(served, ImageTensors):
            return served.with_transform(self.batch_transform(train))
        return ClassSubset(served.dataset, served.indices, served.labels, self.transform(train))

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
        samples = {"train": (train, *_select(train_labels, served)), "eval": (held_out, *_select(eval_labels, served))}
        if self.val_fraction:
            dataset, indices, targets = samples["train"]
            kept, val = _validation_split(indices, targets, self.val_fraction)
            samples["train"], samples["val"] = (dataset, *kept), (dataset, *val)
        parts: dict[str, ClassSubset | ImageTensors] = {}
        for part, (dataset, indices, targets) in samples.items():
            limit = self.limit_per_class if part == "train" else self.eval_limit_per_class
            indices, targets = _first_per_class(indices, targets, limit)
            present = set(targets)
            empty = [c for k, c in enumerate(served) if k not in present]
            if empty and part == "val":
                raise ConfigError(
                    f"data.val_fraction={self.val_fraction} leaves class {empty} no validation "
                    "images; raise it (or data.eval_limit_per_class)"
                )
            if empty:
                labels = train_labels if part == "train" else eval_labels
                found = sorted({str(label) for label in labels}, key=lambda s: (len(s), s))
                raise DataError(
                    f"{self.spec.title} has no {part} images of class {empty} under {self.root} "
                    f"(classes present: {', '.join(found)}); fix the class lists or data.root."
                )
            train_transform = part == "train"
            if self.as_tensors:
                images = decode(dataset, indices, self.image_size)
                transform = self.batch_transform(train_transform)
                parts[part] = ImageTensors(images, targets, transform, dataset=dataset, indices=indices)
            else:
                parts[part] = ClassSubset(dataset, indices, targets, self.transform(train_transform))
        self.train_set, self.val_set, self.eval_set = parts["train"], parts.get("val"), parts["eval"]

    # ---- loaders

    def device(self) -> torch.device:
        """Where the attached trainer trains (the CPU without one)."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _stored_on_device(self, images: torch.Tensor, device: torch.device) -> bool:
        if device.type == "cpu" or self.on_device is False:
            return False
        if self.on_device is True or device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return images.numel() * images.element_size() <= ON_DEVICE_SHARE * free

    def _workers(self, device: torch.device) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if device.type == "cpu":
            return 0  # training uses every core
        return suggested_max_num_workers(self.trainer.num_devices if self.trainer is not None else 1)

    def for_device(self, dataset: ClassSubset | ImageTensors, device: torch.device) -> tuple[Dataset, dict]:
        """``dataset`` ready for ``device`` and the DataLoader arguments that suit it: decoded images
        are batched in this process, on the device (held there when ``on_device`` says so); the
        per-image pipeline runs in workers, into pinned memory for a GPU."""
        if isinstance(dataset, ImageTensors):
            dataset, workers, pin = dataset.placed(device, self._stored_on_device(dataset.images, device)), 0, False
        else:
            workers, pin = self._workers(device), device.type == "cuda"
        return dataset, {
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": pin,
            "collate_fn": getattr(dataset, "collate_fn", None),
        }

    def loader(
        self, dataset: ClassSubset | ImageTensors, shuffle: bool, device: torch.device | None = None
    ) -> DataLoader:
        """A DataLoader of ``dataset`` for ``device`` (default: the trainer's). Training (``shuffle``): the order
        of :class:`EpochShuffle`, batches of :class:`TrainingBatches`; else in order, every image."""
        dataset, common = self.for_device(dataset, device or self.device())
        if shuffle:
            batches = TrainingBatches(EpochShuffle(len(dataset), self.seed), self.batch_size, drop_last=False)
            return DataLoader(dataset, batch_sampler=batches, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)

    def _require(self, dataset):
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset

    def train_dataloader(self) -> DataLoader:
        return self.loader(self._require(self.train_set), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self._require(self.eval_set if self.val_set is None else self.val_set), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self._require(self.eval_set), shuffle=False)
