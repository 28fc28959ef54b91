"""CIFAR-100 (thesis ch. 6: base fine labels 20-99, target 0-19), read with torchvision's reader."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torchvision import datasets as tvd

from bnn_adapt.training.datasets import cifar
from bnn_adapt.training.datasets.generated import labelled_images, write_pickle
from bnn_adapt.training.received_data import RestrictedCIFAR

CLASSES = tuple(  # fine labels, in label order
    (
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
        "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
        "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
        "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
        "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
        "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
        "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
        "worm"
    ).split()
)

BASE_MEAN, BASE_STD = (0.5034, 0.4852, 0.4427), (0.2684, 0.2562, 0.2766)  # of the base split, labels 20-99


class ExistingFilesCIFAR100(RestrictedCIFAR, tvd.CIFAR100):
    """torchvision's CIFAR-100 reader (fine labels), accepting any files that exist."""

    train_list, test_list, meta = cifar.without_md5(tvd.CIFAR100)
    labels_key, class_count = "fine_labels", 100


def write_cifar100(root, n_per_class: int = 2) -> Path:
    """root/cifar-100-python/ with train, test and meta (fine and coarse labels; generated images)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("train", 0), ("test", 1)):
        images, labels = labelled_images(100, n_per_class, 32, 3, seed)
        write_pickle(
            folder / name,
            {
                "filenames": [f"img_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name} (generated)",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": cifar.rows(images),
            },
        )
    write_pickle(
        folder / "meta",
        {
            "fine_label_names": list(CLASSES),
            "coarse_label_names": [f"superclass_{i}" for i in range(20)],
        },
    )
    return folder


DATASET = cifar.spec(
    ExistingFilesCIFAR100, "CIFAR-100", CLASSES, (BASE_MEAN, BASE_STD), partial(write_cifar100, n_per_class=8)
)
