"""Generated pixels for the synthetic datasets: random, but every class has its own colour (brightness for
grayscale), so a small network learns them quickly and the loss visibly falls."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


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


def write_pickle(path: Path, entry: dict) -> None:
    """``entry`` pickled at protocol 2, as the CIFAR python-format files are."""
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
