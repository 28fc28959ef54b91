"""Oxford Flowers-102 (thesis ch. 6): the train split, evaluated on the val split, as torchvision reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets as tvd

from bnn_adapt.training.datasets import torchvision_layout
from bnn_adapt.training.datasets.generated import class_images


class ExistingFilesFlowers102(tvd.Flowers102):
    """torchvision's Flowers-102 reader, accepting any ``.mat`` files that exist (generated ones fail the MD5s)."""

    _file_dict = {key: (name, None) for key, (name, _) in tvd.Flowers102._file_dict.items()}


LAYOUT = torchvision_layout.Layout(
    "Flowers-102",
    ExistingFilesFlowers102,
    ("train", "val"),
    "flowers-102",
    ("jpg", "imagelabels.mat", "setid.mat"),
    tvd.Flowers102._download_url_prefix,
)


def write_flowers102(root, per_split: tuple[int, int, int] = (2, 2, 1), size: int = 24) -> Path:
    """root/flowers-102/ as torchvision's ``Flowers102`` reads it, generated: ``jpg/image_NNNNN.jpg``,
    ``imagelabels.mat`` (1-based label of every image) and ``setid.mat`` (1-based image ids
    of the train / val / test splits: ``trnid``, ``valid``, ``tstid``); ``per_split`` images
    of each of the 102 classes per split."""
    from scipy.io import savemat

    classes = len(tvd.Flowers102.classes)
    folder = Path(root) / LAYOUT.folder
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels: list[int] = []
    splits: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    for split, n in zip(splits, per_split, strict=True):
        for label in range(classes):
            for pixels in class_images(label, classes, n, size, 3, rng):
                labels.append(label + 1)
                image_id = len(labels)
                splits[split].append(image_id)
                Image.fromarray(pixels).save(folder / "jpg" / f"image_{image_id:05d}.jpg", quality=95)
    savemat(folder / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    savemat(folder / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in splits.items()})
    return folder


DATASET = torchvision_layout.spec(LAYOUT, tuple(tvd.Flowers102.classes), write_flowers102)
