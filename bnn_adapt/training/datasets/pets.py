"""Oxford-IIIT Pets (37 breeds, thesis ch. 6): trainval, evaluated on test, as torchvision reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets as tvd

from bnn_adapt.training.datasets import torchvision_layout
from bnn_adapt.training.datasets.generated import class_images

CLASSES = tuple(  # as torchvision.datasets.OxfordIIITPet names them, in label order
    (
        "Abyssinian, American Bulldog, American Pit Bull Terrier, Basset Hound, Beagle, Bengal, Birman, Bombay, "
        "Boxer, British Shorthair, Chihuahua, Egyptian Mau, English Cocker Spaniel, English Setter, German "
        "Shorthaired, Great Pyrenees, Havanese, Japanese Chin, Keeshond, Leonberger, Maine Coon, Miniature "
        "Pinscher, Newfoundland, Persian, Pomeranian, Pug, Ragdoll, Russian Blue, Saint Bernard, Samoyed, "
        "Scottish Terrier, Shiba Inu, Siamese, Sphynx, Staffordshire Bull Terrier, Wheaten Terrier, Yorkshire "
        "Terrier"
    ).split(", ")
)

CATS = frozenset(  # the 12 cat breeds (species 1); the other 25 are dogs (species 2)
    (
        "Abyssinian, Bengal, Birman, Bombay, British Shorthair, Egyptian Mau, Maine Coon, Persian, Ragdoll, "
        "Russian Blue, Siamese, Sphynx"
    ).split(", ")
)

LAYOUT = torchvision_layout.Layout(
    "Oxford-IIIT Pets",
    tvd.OxfordIIITPet,
    ("trainval", "test"),
    "oxford-iiit-pet",
    ("images", "annotations"),
    tvd.OxfordIIITPet._RESOURCES[0][0],
    image_files="_images",
)


def image_stem(breed: str) -> str:
    """The dataset's file-name stem of a breed: cats capitalised, dogs lower case ("american_bulldog")."""
    stem = breed.replace(" ", "_")
    return stem if breed in CATS else stem.lower()


def write_pets(root, per_split: tuple[int, int] = (3, 2), size: int = 24) -> Path:
    """root/oxford-iiit-pet/ as torchvision's ``OxfordIIITPet`` reads it, generated: ``images/<Breed>_<n>.jpg``
    and ``annotations/{trainval,test}.txt`` (lines ``<image id> <class 1-37> <species 1-2> <breed id>``)."""
    folder = Path(root) / LAYOUT.folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counters = dict.fromkeys(CLASSES, 0)
    cats, dogs = [b for b in CLASSES if b in CATS], [b for b in CLASSES if b not in CATS]
    breed_ids = {b: i + 1 for group in (cats, dogs) for i, b in enumerate(group)}  # numbered within a species
    for split, n in zip(("trainval", "test"), per_split, strict=True):
        lines = []
        for label, breed in enumerate(CLASSES):
            species = 1 if breed in CATS else 2
            for pixels in class_images(label, len(CLASSES), n, size, 3, rng):
                counters[breed] += 1
                image_id = f"{image_stem(breed)}_{counters[breed]}"
                Image.fromarray(pixels).save(folder / "images" / f"{image_id}.jpg", quality=95)
                lines.append(f"{image_id} {label + 1} {species} {breed_ids[breed]}")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


DATASET = torchvision_layout.spec(LAYOUT, CLASSES, write_pets)
