"""Your own images: ``root/train/<class>/*`` and ``root/test/<class>/*``; the classes are the folder names,
the statistics and pipeline follow the image size (224 px and up: ImageNet's)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import find_classes

from bnn_adapt.errors import DataError
from bnn_adapt.training.datasets import DatasetSpec, LabelledSet
from bnn_adapt.training.datasets.generated import class_images
from bnn_adapt.training.datasets.reading import dataset_errors
from bnn_adapt.training.received_data import OnceImageFolder, open_rgb


def part_dir(root: str, part: str) -> Path:
    folder = Path(root) / part
    if not folder.is_dir():
        raise DataError(
            f"imagefolder needs {root}/train/<class>/* and {root}/test/<class>/*, but {folder} is missing; "
            "set data.root=... to such a folder."
        )
    return folder


def missing(root: str) -> str | None:
    absent = [part for part in ("train", "test") if not (Path(root) / part).is_dir()]
    return f"{root} lacks {' and '.join(p + '/<class>/' for p in absent)}" if absent else None


def classes_on_disk(root: str) -> list[str]:
    """The class folders under root/train, sorted."""
    folder = part_dir(root, "train")
    with dataset_errors(f"no class folders under {folder}; add root/train/<class>/ folders or fix data.root"):
        return find_classes(str(folder))[0]


def load(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """Both parts, images decoded on access; the labels are folder names."""
    parts = []
    for part in ("train", "test"):
        folder = part_dir(root, part)
        with dataset_errors(f"no images under {folder}/<class>/; add some or fix data.root"):
            dataset = OnceImageFolder(str(folder), loader=open_rgb, allow_empty=True)
        parts.append((dataset, [dataset.classes[t] for t in dataset.targets]))
    return tuple(parts)  # type: ignore[return-value]


def source(root: str, held_out: OnceImageFolder, row: int) -> str:
    """A test image as its path under ``data.root`` (``test/<class>/<file>``)."""
    return Path(os.path.relpath(held_out.samples[row][0], root)).as_posix()


def write_imagefolder(
    root, classes=("cat", "dog", "3"), n_per_class: int = 3, grayscale_some: bool = True, size: int = 12
) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, generated; every other image grayscale if asked."""
    for part, seed in (("train", 0), ("test", 1)):
        rng = np.random.default_rng(seed)
        for label, name in enumerate(classes):
            folder = Path(root) / part / str(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(class_images(label, len(classes), n_per_class, size, 3, rng)):
                image = Image.fromarray(pixels)
                if grayscale_some and i % 2:
                    image = image.convert("L")
                image.save(folder / f"{name}_{i}.png")
    return Path(root)


DATASET = DatasetSpec(
    "imagefolder",
    load,
    None,
    None,
    None,
    large=None,
    missing=missing,
    classes_on_disk=classes_on_disk,
    source=source,
)
