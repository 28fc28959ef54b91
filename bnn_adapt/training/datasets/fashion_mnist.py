"""Fashion-MNIST from its four IDX files (plain or .gz): in ``data.root``, ``root/FashionMNIST/raw`` (where
torchvision downloads) or the Debian package's folder (``apt-get install dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file

from bnn_adapt.errors import DataError
from bnn_adapt.training.datasets import HALF, DatasetSpec, LabelledSet
from bnn_adapt.training.datasets.generated import labelled_images
from bnn_adapt.training.datasets.reading import dataset_errors, fetch_dataset

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

SYSTEM_DIRS: tuple[str, ...] = (DEBIAN_DIR,)  # searched after root

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

NAMES = ", ".join(stem for pair in FILES.values() for stem in pair)


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, which opens only uncompressed files."""
    with dataset_errors(f"{path} is not a readable IDX file; replace it"):
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path) as packed, tempfile.NamedTemporaryFile(suffix=".idx") as plain:
            shutil.copyfileobj(packed, plain)
            plain.flush()
            return reader(plain.name)


def found_files(root: str) -> dict[str, Path] | None:
    """The four IDX files (plain or .gz) from the first folder that has them all."""
    folders = [Path(root), Path(root) / "FashionMNIST" / "raw", *map(Path, SYSTEM_DIRS)]
    stems = [stem for pair in FILES.values() for stem in pair]
    for folder in folders:
        found = {s: next((folder / n for n in (s, s + ".gz") if (folder / n).is_file()), None) for s in stems}
        if all(found.values()):
            if folder in map(Path, SYSTEM_DIRS) and folder != Path(root):
                log.info("Fashion-MNIST not under %s; using the system copy in %s", root, folder)
            return found  # type: ignore[return-value]
    return None


def files(root: str) -> tuple[Path, list[Path] | None]:
    """The folder the four files are read from and the files (none found: root, no files)."""
    found = found_files(root)
    if found is None:
        return Path(root).resolve(), []
    paths = sorted(path.resolve() for path in found.values())
    return paths[0].parent, paths


def missing(root: str) -> str | None:
    if found_files(root) is not None:
        return None
    return f"Fashion-MNIST not found in {root} or {root}/FashionMNIST/raw: need {NAMES} (plain or .gz)"


def load(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """Both splits as uint8 tensors (N, 1, 28, 28) and their labels."""
    if download and found_files(root) is None:
        fetch_dataset(
            "Fashion-MNIST",
            tvd.FashionMNIST.mirrors[0],
            root,
            f"put {NAMES} (plain or .gz) into {root}, or apt-get install dataset-fashion-mnist",
            lambda: tvd.FashionMNIST(root, train=True, download=True),
        )
    found = found_files(root)
    if found is None:
        raise DataError(
            missing(root) + f"; set data.root={DEBIAN_DIR} (apt-get install "
            "dataset-fashion-mnist) or data.download=true."
        )
    parts = []
    for image_stem, label_stem in FILES.values():
        images = _read_idx(found[image_stem], read_image_file)
        labels = _read_idx(found[label_stem], read_label_file)
        if len(images) != len(labels):
            raise DataError(
                f"{found[image_stem]} holds {len(images)} images but {found[label_stem]} "
                f"{len(labels)} labels; replace the files."
            )
        parts.append((TensorDataset(images.unsqueeze(1), labels), labels.tolist()))
    return tuple(parts)  # type: ignore[return-value]


def source(root: str, held_out, row: int) -> str:
    """A test image as its file and row: ``t10k-images-idx3-ubyte:<row>``."""
    return f"{FILES['eval'][0]}:{row}"


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_idx(root, n_per_class: int = 3, gz: bool = True, torchvision_layout: bool = False) -> Path:
    """The four IDX files (28x28 grayscale, generated), .gz or plain, in root or root/FashionMNIST/raw."""
    folder = Path(root) / "FashionMNIST" / "raw" if torchvision_layout else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, seed in (("train", 0), ("t10k", 1)):
        images, labels = labelled_images(10, n_per_class, 28, 1, seed)
        for kind, array in (("images-idx3", images[..., 0]), ("labels-idx1", labels)):
            path = folder / f"{prefix}-{kind}-ubyte"
            payload = _idx_bytes(array)
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(payload)
            else:
                path.write_bytes(payload)
    return folder


DATASET = DatasetSpec(
    "Fashion-MNIST",
    load,
    tuple(tvd.FashionMNIST.classes),
    HALF,
    HALF,
    large=False,
    missing=missing,
    files=files,
    synthetic=partial(write_fashion_idx, n_per_class=32),
    source=source,
)
