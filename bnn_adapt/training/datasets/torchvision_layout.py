"""Datasets torchvision reads from one folder of named parts under ``data.root`` (Flowers-102, Pets), on an
ImageNet base: the 224-px pipeline and ImageNet's statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bnn_adapt.training.datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, LabelledSet
from bnn_adapt.training.datasets.reading import dataset_errors, fetch_dataset


@dataclass(frozen=True)
class Layout:
    """What torchvision's reader ``reader`` needs under root: ``folder`` holding ``parts``."""

    title: str
    reader: type
    splits: tuple[str, str]  # (train, held-out) as the reader names them
    folder: str
    parts: tuple[str, ...]
    url: str  # where a download comes from
    image_files: str = "_image_files"  # the reader's list of image paths, in its order


def missing(layout: Layout, root: str) -> str | None:
    absent = [p for p in layout.parts if not (Path(root) / layout.folder / p).exists()]
    folder = Path(root) / layout.folder
    return f"{folder} lacks {', '.join(absent)} (expected {', '.join(layout.parts)})" if absent else None


def source(layout: Layout, root: str, held_out, row: int) -> str:
    """A held-out image as its path under ``data.root``."""
    return Path(os.path.relpath(getattr(held_out, layout.image_files)[row], root)).as_posix()


def files(layout: Layout, root: str) -> tuple[Path, None]:
    return Path(root) / layout.folder, None


def load(layout: Layout, root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """torchvision's reader for the (train, eval) splits."""
    folder, parts = Path(root) / layout.folder, layout.parts
    if download and missing(layout, root):
        fetch_dataset(
            layout.title,
            layout.url,
            root,
            f"put {folder}/ ({', '.join(parts)}) there",
            lambda: layout.reader(root, split=layout.splits[0], download=True),
        )
    problem = (
        f"{layout.title} not found: expected {folder}/{{{','.join(parts)}}}; set data.root=... or data.download=true"
    )
    with dataset_errors(problem):
        train, held_out = (layout.reader(root, split=split) for split in layout.splits)
    return (train, train._labels), (held_out, held_out._labels)


def spec(layout: Layout, classes: tuple[str, ...], synthetic) -> DatasetSpec:
    return DatasetSpec(
        layout.title,
        partial(load, layout),
        classes,
        IMAGENET_MEAN,
        IMAGENET_STD,
        large=True,
        missing=partial(missing, layout),
        files=partial(files, layout),
        synthetic=synthetic,
        source=partial(source, layout),
    )
