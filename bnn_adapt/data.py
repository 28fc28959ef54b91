"""Class-split image datasets: base classes to pretrain a BNN, disjoint target classes to adapt it.

One datamodule serves either the *base* or the *target* classes of a dataset, with
labels remapped to 0..C-1 in the order given (thesis ch. 5-6: CIFAR 5-5, CIFAR 80-20,
Flowers-102, Pets; SPEC section 5). Files are read with torchvision's dataset
classes; constructing the module reads nothing, ``setup()`` does.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import pickle
import shutil
import tempfile
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import find_classes
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms import v2

from bnn_adapt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Folders searched for Fashion-MNIST after ``root`` (Debian: apt-get install dataset-fashion-mnist).
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_SYSTEM_DIRS: tuple[str, ...] = (DEBIAN_FASHION_DIR,)
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DIGITS_SPLIT_SEED = 0  # fixed, so every run sees the same held-out digits whatever its seed
LARGE_IMAGE_SIZE = 128  # imagefolder sets at least this big get the 224-px (ImageNet) pipeline

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# Statistics of the base splits (SPEC section 5): CIFAR-10 labels 0-4, CIFAR-100 labels 20-99.
CIFAR10_BASE_MEAN, CIFAR10_BASE_STD = (0.4906, 0.4856, 0.4508), (0.2454, 0.2415, 0.2620)
CIFAR100_BASE_MEAN, CIFAR100_BASE_STD = (0.5034, 0.4852, 0.4427), (0.2684, 0.2562, 0.2766)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
PETS_CLASSES = (  # as torchvision.datasets.OxfordIIITPet names them, in label order
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
    "Bengal", "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
    "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees",
    "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher",
    "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard",
    "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx",
    "Staffordshire Bull Terrier", "Wheaten Terrier", "Yorkshire Terrier",
)  # fmt: skip

LabelledSet = tuple[Dataset, Sequence]  # a dataset and its per-sample labels, read without decoding images


# --------------------------------------------------------------------------- readers


@contextlib.contextmanager
def _dataset_errors(problem: str):
    """Turn the errors torchvision and the file readers raise into one DataError naming the fix."""
    try:
        yield
    except (
        RuntimeError, OSError, urllib.error.URLError, pickle.UnpicklingError, EOFError,
        KeyError, ValueError, TypeError, AssertionError,
    ) as err:  # fmt: skip
        raise DataError(f"{problem} ({type(err).__name__}: {err})") from err


def _load_digits(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]; a stratified 25% is held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    return tuple(  # type: ignore[return-value]
        (TensorDataset(images[idx], labels[idx]), labels[idx].tolist()) for idx in (train_idx, eval_idx)
    )


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, which opens only uncompressed files."""
    with _dataset_errors(f"{path} is not a readable IDX file; replace it or set data.download=true"):
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path) as packed, tempfile.NamedTemporaryFile(suffix=".idx") as plain:
            shutil.copyfileobj(packed, plain)
            plain.flush()
            return reader(plain.name)


def _fashion_files(root: str) -> dict[str, Path] | None:
    """The four IDX files (plain or .gz) from the first folder that has them all."""
    folders = [Path(root), Path(root) / "FashionMNIST" / "raw", *map(Path, FASHION_SYSTEM_DIRS)]
    stems = [stem for pair in FASHION_FILES.values() for stem in pair]
    for folder in folders:
        found = {s: next((folder / n for n in (s, s + ".gz") if (folder / n).is_file()), None) for s in stems}
        if all(found.values()):
            if folder in map(Path, FASHION_SYSTEM_DIRS) and folder != Path(root):
                log.info("Fashion-MNIST not under %s; using the system copy in %s", root, folder)
            return found  # type: ignore[return-value]
    return None


def _load_fashion(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """Fashion-MNIST from the standard IDX files: in root, root/FashionMNIST/raw/ or the Debian folder."""
    if download:
        with _dataset_errors(f"downloading Fashion-MNIST into {root} failed; are you online?"):
            tvd.FashionMNIST(root, train=True, download=True)
    files = _fashion_files(root)
    if files is None:
        names = ", ".join(s for pair in FASHION_FILES.values() for s in pair)
        raise DataError(
            f"Fashion-MNIST not found in {root} or {root}/FashionMNIST/raw: need {names} (plain or .gz); "
            f"set data.root={DEBIAN_FASHION_DIR} (apt-get install dataset-fashion-mnist) "
            "or data.download=true."
        )
    parts = []
    for image_stem, label_stem in FASHION_FILES.values():
        images = _read_idx(files[image_stem], read_image_file)
        labels = _read_idx(files[label_stem], read_label_file)
        if len(images) != len(labels):
            raise DataError(
                f"{files[image_stem]} holds {len(images)} images but {files[label_stem]} "
                f"{len(labels)} labels; replace the files or set data.download=true."
            )
        parts.append((TensorDataset(images.unsqueeze(1), labels), labels.tolist()))
    return tuple(parts)  # type: ignore[return-value]


def _without_md5(cls: type[tvd.CIFAR10]) -> tuple[list, list, dict]:
    """File lists of a torchvision CIFAR class with the MD5 sums dropped: existing files pass."""
    return (
        [[name, None] for name, _ in cls.train_list],
        [[name, None] for name, _ in cls.test_list],
        {**cls.meta, "md5": None},
    )


class ExistingFilesCIFAR10(tvd.CIFAR10):
    """torchvision's CIFAR-10 reader, accepting any files that exist (generated ones fail the MD5s)."""

    train_list, test_list, meta = _without_md5(tvd.CIFAR10)


class ExistingFilesCIFAR100(tvd.CIFAR100):
    """torchvision's CIFAR-100 reader (fine labels), accepting any files that exist."""

    train_list, test_list, meta = _without_md5(tvd.CIFAR100)


class ExistingFilesFlowers102(tvd.Flowers102):
    """torchvision's Flowers-102 reader, accepting any ``.mat`` files that exist (generated ones fail the MD5s)."""

    _file_dict = {key: (name, None) for key, (name, _) in tvd.Flowers102._file_dict.items()}


def _load_cifar(cls: type[tvd.CIFAR10], root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """CIFAR-10/100 in the python-pickle format under root/<base_folder>/; eval = test set."""
    folder = Path(root) / cls.base_folder
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing and not download:
        raise DataError(
            f"{folder} lacks {', '.join(missing)} (expected {', '.join(expected)}); "
            f"set data.root to the folder holding {cls.base_folder}/ or data.download=true."
        )
    with _dataset_errors(f"cannot read {folder}; replace the files or set data.download=true"):
        train = cls(root, train=True, download=download)
        test = cls(root, train=False)
    return (train, train.targets), (test, test.targets)


def _load_torchvision_split(
    cls: type, splits: tuple[str, str], layout: str, root: str, download: bool
) -> tuple[LabelledSet, LabelledSet]:
    """Flowers-102 / Oxford-IIIT Pets: torchvision's reader for the (train, eval) splits."""
    problem = (
        f"{cls.__name__.removeprefix('ExistingFiles')} not found: expected {Path(root) / layout}; "
        "set data.root=... or data.download=true"
    )
    with _dataset_errors(problem):
        train, held_out = (cls(root, split=split, download=download) for split in splits)
    return (train, train._labels), (held_out, held_out._labels)


def open_rgb(path: str) -> Image.Image:
    """ImageFolder loader: any PIL-readable image as RGB; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path} ({err}); delete or replace the file.") from err


def _imagefolder_dir(root: str, part: str) -> Path:
    folder = Path(root) / part
    if not folder.is_dir():
        raise DataError(
            f"imagefolder needs {root}/train/<class>/* and {root}/test/<class>/*, but {folder} is missing; "
            "set data.root=... to such a folder."
        )
    return folder


def _load_imagefolder(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """The user's own root/train/<class>/* and root/test/<class>/*; labels are folder names."""
    parts = []
    for part in ("train", "test"):
        folder = _imagefolder_dir(root, part)
        with _dataset_errors(f"no images under {folder}/<class>/; add some or fix data.root"):
            dataset = tvd.ImageFolder(str(folder), loader=open_rgb, allow_empty=True)
        parts.append((dataset, [dataset.classes[t] for t in dataset.targets]))
    return tuple(parts)  # type: ignore[return-value]


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class DatasetSpec:
    """What the datamodule needs to know about one source dataset."""

    title: str
    load: Callable[[str, bool], tuple[LabelledSet, LabelledSet]]
    class_names: tuple[str, ...] | None  # None: folder names, found on disk
    mean: tuple[float, ...] | None  # None: chosen by image size (imagefolder)
    std: tuple[float, ...] | None
    large: bool | None  # 224-px pipeline (rotation, resized crop, flips); None: by image size
    hflip: bool = False  # horizontal flips in the small-image pipeline (CIFAR)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "scikit-learn digits", _load_digits, tuple(str(d) for d in range(10)), HALF, HALF, False
    ),
    "fashion_mnist": DatasetSpec(
        "Fashion-MNIST", _load_fashion, tuple(tvd.FashionMNIST.classes), HALF, HALF, False
    ),
    "cifar10": DatasetSpec(
        "CIFAR-10", partial(_load_cifar, ExistingFilesCIFAR10), CIFAR10_CLASSES,
        CIFAR10_BASE_MEAN, CIFAR10_BASE_STD, False, hflip=True,
    ),  # fmt: skip
    "cifar100": DatasetSpec(
        "CIFAR-100", partial(_load_cifar, ExistingFilesCIFAR100), CIFAR100_CLASSES,
        CIFAR100_BASE_MEAN, CIFAR100_BASE_STD, False, hflip=True,
    ),  # fmt: skip
    "flowers102": DatasetSpec(
        "Flowers-102",
        partial(_load_torchvision_split, ExistingFilesFlowers102, ("train", "val"),
                "flowers-102/{jpg/,imagelabels.mat,setid.mat}"),
        tuple(tvd.Flowers102.classes), IMAGENET_MEAN, IMAGENET_STD, True,
    ),  # fmt: skip
    "pets": DatasetSpec(
        "Oxford-IIIT Pets",
        partial(_load_torchvision_split, tvd.OxfordIIITPet, ("trainval", "test"),
                "oxford-iiit-pet/{images/,annotations/}"),
        PETS_CLASSES, IMAGENET_MEAN, IMAGENET_STD, True,
    ),  # fmt: skip
    "imagefolder": DatasetSpec("imagefolder", _load_imagefolder, None, None, None, None),
}


# --------------------------------------------------------------------------- datamodule


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
        cached_views: int = 1,
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
        # views per training image in a tap cache (adapter.cache_taps; 1 = no augmentation): bnn_adapt.tap_cache
        self.cached_views = _positive(cached_views, "cached_views")
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
        folder = _imagefolder_dir(self.root, "train")
        problem = f"no class folders under {folder}; add root/train/<class>/ folders or fix data.root"
        with _dataset_errors(problem):
            return find_classes(str(folder))[0]

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
