"""CIFAR-10 and CIFAR-100 in the python-pickle format under ``root/<base_folder>/`` (eval = the test set):
the reader, the download and the generator they share (:mod:`.cifar10`, :mod:`.cifar100`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd

from bnn_adapt.errors import DataError
from bnn_adapt.training.datasets import DatasetSpec, LabelledSet
from bnn_adapt.training.datasets.reading import dataset_errors, fetch_dataset


def without_md5(cls: type[tvd.CIFAR10]) -> tuple[list, list, dict]:
    """File lists of a torchvision CIFAR class with the MD5 sums dropped: existing files pass."""
    return (
        [[name, None] for name, _ in cls.train_list],
        [[name, None] for name, _ in cls.test_list],
        {**cls.meta, "md5": None},
    )


def missing(cls: type[tvd.CIFAR10], root: str) -> str | None:
    folder = Path(root) / cls.base_folder
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    absent = [name for name in expected if not (folder / name).is_file()]
    if not folder.is_dir():
        return f"{folder} does not exist (it must hold {', '.join(expected)})"
    return f"{folder} lacks {', '.join(absent)} (expected {', '.join(expected)})" if absent else None


def files(cls: type[tvd.CIFAR10], root: str) -> tuple[Path, None]:
    return Path(root) / cls.base_folder, None


def source(cls: type[tvd.CIFAR10], root: str, held_out, row: int) -> str:
    """A test image as its file and row: ``test_batch:<row>`` (CIFAR-10), ``test:<row>`` (CIFAR-100)."""
    return f"{cls.test_list[0][0]}:{row}"


def load(cls: type[tvd.CIFAR10], title: str, root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """The training and test sets with their labels."""
    folder, absent = Path(root) / cls.base_folder, missing(cls, root)
    if absent and download:
        fetch_dataset(
            title,
            cls.url,
            root,
            f"unpack {cls.filename} into {root}, so that {folder}/ holds its files",
            lambda: cls(root, train=True, download=True),
        )
    elif absent:
        raise DataError(f"{absent}; set data.root to the folder holding {cls.base_folder}/ or data.download=true.")
    with dataset_errors(f"cannot read {folder}; replace the files"):
        train = cls(root, train=True)
        test = cls(root, train=False)
    return (train, train.targets), (test, test.targets)


def rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: 3072 bytes per image, the R, G then B planes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def spec(
    cls: type[tvd.CIFAR10],
    title: str,
    classes: tuple[str, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    synthetic,
) -> DatasetSpec:
    """A CIFAR dataset: the small-image pipeline with crops and horizontal flips."""
    return DatasetSpec(
        title,
        partial(load, cls, title),
        classes,
        *stats,
        large=False,
        hflip=True,
        missing=partial(missing, cls),
        files=partial(files, cls),
        synthetic=synthetic,
        source=partial(source, cls),
    )
