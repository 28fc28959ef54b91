"""CIFAR-10 (thesis ch. 5: base airplane..deer, target dog..truck), read with torchvision's reader."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd

from bnn_adapt.training.datasets import cifar
from bnn_adapt.training.datasets.generated import labelled_images, write_pickle
from bnn_adapt.training.received_data import RestrictedCIFAR

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

BASE_MEAN, BASE_STD = (0.4906, 0.4856, 0.4508), (0.2454, 0.2415, 0.2620)  # of the base split, labels 0-4


class ExistingFilesCIFAR10(RestrictedCIFAR, tvd.CIFAR10):
    """torchvision's CIFAR-10 reader, accepting any files that exist (generated ones fail the MD5s)."""

    train_list, test_list, meta = cifar.without_md5(tvd.CIFAR10)


def write_cifar10(root, n_per_class: int = 4) -> Path:
    """root/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (generated images)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed, batches in (("data_batch_{}", 0, 5), ("test_batch", 1, 1)):
        images, labels = labelled_images(10, n_per_class, 32, 3, seed)
        for k, idx in enumerate(np.array_split(np.arange(len(labels)), batches), start=1):
            write_pickle(
                folder / name.format(k),
                {
                    "batch_label": f"{name.format(k)} (generated)",
                    "labels": labels[idx].tolist(),
                    "data": cifar.rows(images[idx]),
                    "filenames": [f"img_{i}.png" for i in idx],
                },
            )
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": 2 * n_per_class, "num_vis": 3072}
    write_pickle(folder / "batches.meta", meta)
    return folder


DATASET = cifar.spec(
    ExistingFilesCIFAR10, "CIFAR-10", CLASSES, (BASE_MEAN, BASE_STD), partial(write_cifar10, n_per_class=32)
)
