"""The source datasets, one module each: what a dataset is, and how ``data.name`` finds its module.

A dataset module (``digits.py``, ``cifar10.py``, ... here, or any importable module of
your own) defines ``DATASET``, a :class:`DatasetSpec`: its reader, classes, statistics,
the files it reads under ``data.root`` (what the data fingerprint covers), how a test
image's source is named and a generator of tiny data in its on-disk format. Nothing else in bnn_adapt names a dataset: the
datamodule, the fingerprint and the smoke data ask the spec (docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from bnn_adapt.errors import ConfigError

LabelledSet = tuple[Dataset, Sequence]  # a dataset and its per-sample labels, read without decoding images

LARGE_IMAGE_SIZE = 128  # sets sized by image (class statistics None) at least this big get the 224-px pipeline

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

HALF = (0.5, 0.5, 0.5)


def nothing_missing(root: str) -> None:
    """A dataset that needs no files (one shipped with a package): nothing is ever missing.
    A module-level function, not a lambda: ``trainer=ddp`` (ddp_spawn) pickles the datamodule."""


def held_out_row(root: str, held_out: Dataset, row: int) -> str:
    """A held-out image named by its row in the dataset's held-out split: ``test:<row>``."""
    return f"test:{row}"


def whole_root(root: str) -> tuple[Path, None]:
    """The files a dataset reads are every file under ``data.root``."""
    return Path(root), None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything bnn_adapt knows about one source dataset; the functions are module-level (picklable)."""

    title: str
    load: Callable[[str, bool], tuple[LabelledSet, LabelledSet]]  # (root, download) -> (train, held-out)
    class_names: tuple[str, ...] | None  # None: folder names, found on disk by ``classes_on_disk``
    mean: tuple[float, ...] | None  # None: chosen by the pipeline (ImageNet's for 224 px, else 0.5)
    std: tuple[float, ...] | None
    large: bool | None  # 224-px pipeline (rotation, resized crop, flips); None: by image size
    hflip: bool = False  # horizontal flips in the small-image pipeline
    missing: Callable[[str], str | None] = nothing_missing  # what root lacks, in words (reads nothing)
    #: the files a run reads: (their folder, the files; None: every file under the folder)
    files: Callable[[str], tuple[Path, list[Path] | None]] = whole_root
    embedded: str | None = None  # read from a package, not from files: what it is (no fingerprint)
    synthetic: Callable[[Path], object] | None = None  # writes tiny data in its format (PROFILE=smoke reads it)
    classes_on_disk: Callable[[str], list[str]] | None = None  # class_names None: the class names under root
    #: (root, held-out set, row) -> where that image comes from, as ``task=evaluate``'s predictions.csv names it
    source: Callable[[str, Dataset, int], str] = held_out_row

    def statistics(self, large: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) to normalise with: the dataset's, else ImageNet's for the 224-px pipeline, else 0.5."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        return (IMAGENET_MEAN, IMAGENET_STD) if large else (HALF, HALF)


def built_in() -> list[str]:
    """The names of the datasets in this package (its modules that define ``DATASET``)."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return [name for name in names if hasattr(importlib.import_module(f"{__name__}.{name}"), "DATASET")]


def find(name: str) -> DatasetSpec:
    """``data.name``'s spec: ``DATASET`` of this package's module ``name``, or of the importable module ``name``."""
    valid = isinstance(name, str) and all(part.isidentifier() for part in name.split("."))
    for module_name in (f"{__name__}.{name}", name) if valid else ():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and (module_name + ".").startswith(err.name + "."):
                continue  # no such module: try the next place
            raise
        spec = getattr(module, "DATASET", None)
        if isinstance(spec, DatasetSpec):
            return spec
    raise ConfigError(
        f"data.name={name!r} is unknown; choose one of {', '.join(built_in())}, or name a module that defines "
        "DATASET (docs/extending.md, Adding a dataset)."
    )
