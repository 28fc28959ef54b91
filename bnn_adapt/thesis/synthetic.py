"""Small generated datasets in the real on-disk formats, and a tiny ReActNet checkpoint.

``PROFILE=smoke`` (conf/profile/smoke.yaml) runs every thesis table on these, so the
whole pipeline -- torchvision's readers, class splits, base pretraining, adapters,
tables -- is exercised on any machine without downloads; the tests use them too.
Pixels are random, but every class has its own colour (brightness for grayscale),
so a small network learns them quickly and the loss visibly falls.

``python -m bnn_adapt.thesis.synthetic [ROOT]`` writes everything the smoke profile reads
(default ROOT: ``$BNN_ADAPT_ROOT/data/smoke``, the smoke profile's ``paths.data_dir``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bnn_adapt.training.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES, PETS_CLASSES

FLOWERS_CLASSES = 102


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


def write_flowers102(root, per_split: tuple[int, int, int] = (2, 2, 1), size: int = 24) -> Path:
    """root/flowers-102/ as torchvision's ``Flowers102`` reads it: ``jpg/image_NNNNN.jpg``,
    ``imagelabels.mat`` (1-based label of every image) and ``setid.mat`` (1-based image ids
    of the train / val / test splits: ``trnid``, ``valid``, ``tstid``); ``per_split`` images
    of each of the 102 classes per split."""
    from scipy.io import savemat

    folder = Path(root) / "flowers-102"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels: list[int] = []
    splits: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    for split, n in zip(splits, per_split, strict=True):
        for label in range(FLOWERS_CLASSES):
            for pixels in class_images(label, FLOWERS_CLASSES, n, size, 3, rng):
                labels.append(label + 1)
                image_id = len(labels)
                splits[split].append(image_id)
                Image.fromarray(pixels).save(folder / "jpg" / f"image_{image_id:05d}.jpg", quality=95)
    savemat(folder / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    savemat(folder / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in splits.items()})
    return folder


# the 12 cat breeds of Oxford-IIIT Pets (species 1); the other 25 are dogs (species 2)
PETS_CATS = frozenset(
    (
        "Abyssinian",
        "Bengal",
        "Birman",
        "Bombay",
        "British Shorthair",
        "Egyptian Mau",
        "Maine Coon",
        "Persian",
        "Ragdoll",
        "Russian Blue",
        "Siamese",
        "Sphynx",
    )
)


def pets_image_stem(breed: str) -> str:
    """The dataset's file-name stem of a breed: cats capitalised, dogs lower case ("american_bulldog")."""
    stem = breed.replace(" ", "_")
    return stem if breed in PETS_CATS else stem.lower()


def write_pets(root, per_split: tuple[int, int] = (3, 2), size: int = 24) -> Path:
    """root/oxford-iiit-pet/ as torchvision's ``OxfordIIITPet`` reads it: ``images/<Breed>_<n>.jpg``
    and ``annotations/{trainval,test}.txt`` (lines ``<image id> <class 1-37> <species 1-2> <breed id>``)."""
    folder = Path(root) / "oxford-iiit-pet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counters = dict.fromkeys(PETS_CLASSES, 0)
    cats, dogs = [b for b in PETS_CLASSES if b in PETS_CATS], [b for b in PETS_CLASSES if b not in PETS_CATS]
    breed_ids = {b: i + 1 for group in (cats, dogs) for i, b in enumerate(group)}  # numbered within a species
    for split, n in zip(("trainval", "test"), per_split, strict=True):
        lines = []
        for label, breed in enumerate(PETS_CLASSES):
            species = 1 if breed in PETS_CATS else 2
            for pixels in class_images(label, len(PETS_CLASSES), n, size, 3, rng):
                counters[breed] += 1
                image_id = f"{pets_image_stem(breed)}_{counters[breed]}"
                Image.fromarray(pixels).save(folder / "images" / f"{image_id}.jpg", quality=95)
                lines.append(f"{image_id} {label + 1} {species} {breed_ids[breed]}")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_reactnet_checkpoint(path, width: float = 0.25, num_classes: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised ReActNet-18 saved in the authors' ``model_best.pth.tar`` format."""
    import torch

    from bnn_adapt.bases.reactnet import ReActNet18
    from bnn_adapt.bases.reactnet_checkpoint import save_reactnet_checkpoint

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_reactnet_checkpoint(ReActNet18(num_classes=num_classes, width=width), str(path))
    return path


# How much conf/profile/smoke.yaml reads from paths.data_dir.
SMOKE_SIZES = {"cifar10_per_class": 32, "cifar100_per_class": 8, "fashion_per_class": 32}
SMOKE_REACTNET_WIDTH = 0.25  # = base.width in conf/profile/smoke.yaml


def write_smoke_data(root) -> Path:
    """Everything ``PROFILE=smoke`` reads, under ``root`` (its ``paths.data_dir``); existing parts are kept."""
    root = Path(root)
    parts = {
        "cifar10/cifar-10-batches-py": lambda: write_cifar10(root / "cifar10", SMOKE_SIZES["cifar10_per_class"]),
        "cifar100/cifar-100-python": lambda: write_cifar100(root / "cifar100", SMOKE_SIZES["cifar100_per_class"]),
        "fashion_mnist/train-images-idx3-ubyte.gz": lambda: write_fashion_idx(
            root / "fashion_mnist", SMOKE_SIZES["fashion_per_class"]
        ),
        "flowers102/flowers-102": lambda: write_flowers102(root / "flowers102"),
        "pets/oxford-iiit-pet": lambda: write_pets(root / "pets"),
        "reactnet18/model_best.pth.tar": lambda: write_reactnet_checkpoint(
            root / "reactnet18" / "model_best.pth.tar", width=SMOKE_REACTNET_WIDTH
        ),
    }
    for name, write in parts.items():
        if not (root / name).exists():
            write()
            print(f"generated {root / name}")
    return root


def main(argv: list[str] | None = None) -> int:
    default = Path(os.environ.get("BNN_ADAPT_ROOT", ".")) / "data" / "smoke"
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.thesis.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=str(default), help=f"where to write (default {default})")
    args = parser.parse_args(argv)
    write_smoke_data(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
