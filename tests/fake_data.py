"""Tiny generated datasets written in the real on-disk formats, for tests.

Pixels are random, but every class has its own colour (brightness for grayscale),
so a small network learns them quickly and end-to-end tests can watch the loss fall.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from bnn_adapt.data import CIFAR10_CLASSES, CIFAR100_CLASSES


def class_images(
    label: int, num_classes: int, n: int, size: int, channels: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` uint8 images (n, size, size, channels) around one colour per class, plus noise."""
    if channels == 1:
        colour = np.array([20 + 215 * label / max(num_classes - 1, 1)])
    else:
        colour = np.random.default_rng(1000 + label).uniform(20, 235, size=channels)
    noise = rng.normal(0, 12, size=(n, size, size, channels))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def labelled_images(
    num_classes: int, n_per_class: int, size: int, channels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled images and labels, ``n_per_class`` of each class."""
    rng = np.random.default_rng(seed)
    images = np.concatenate(
        [class_images(c, num_classes, n_per_class, size, channels, rng) for c in range(num_classes)]
    )
    labels = np.repeat(np.arange(num_classes), n_per_class)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: 3072 bytes per image, the R, G then B planes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root, n_per_class: int = 4) -> Path:
    """root/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed, batches in (("data_batch_{}", 0, 5), ("test_batch", 1, 1)):
        images, labels = labelled_images(10, n_per_class, 32, 3, seed)
        for k, idx in enumerate(np.array_split(np.arange(len(labels)), batches), start=1):
            _pickle(
                folder / name.format(k),
                {
                    "batch_label": f"{name.format(k)} (generated)",
                    "labels": labels[idx].tolist(),
                    "data": _cifar_rows(images[idx]),
                    "filenames": [f"img_{i}.png" for i in idx],
                },
            )
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 2 * n_per_class, "num_vis": 3072}
    _pickle(folder / "batches.meta", meta)
    return folder


def write_cifar100(root, n_per_class: int = 2) -> Path:
    """root/cifar-100-python/ with train, test and meta (fine and coarse labels)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("train", 0), ("test", 1)):
        images, labels = labelled_images(100, n_per_class, 32, 3, seed)
        _pickle(
            folder / name,
            {
                "filenames": [f"img_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name} (generated)",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": _cifar_rows(images),
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": list(CIFAR100_CLASSES),
            "coarse_label_names": [f"superclass_{i}" for i in range(20)],
        },
    )
    return folder


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_idx(root, n_per_class: int = 3, gz: bool = True, torchvision_layout: bool = False) -> Path:
    """The four Fashion-MNIST IDX files (28x28 grayscale), .gz or plain, in root or root/FashionMNIST/raw."""
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


def write_imagefolder(
    root, classes=("cat", "dog", "3"), n_per_class: int = 3, grayscale_some: bool = True, size: int = 12
) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png; every other image grayscale if asked."""
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
