"""ClassSplitDataModule: every source through its real file format, label remapping, errors."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.datasets import ImageFolder

from bnn_adapt.errors import ConfigError, DataError
from bnn_adapt.training.datamodule import ClassSplitDataModule
from bnn_adapt.training.datasets import IMAGENET_MEAN, cifar10, cifar100, fashion_mnist
from tests.helpers.data import write_cifar10, write_cifar100, write_fashion_idx, write_imagefolder


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, n_per_class=4)
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, n_per_class=2)
    return root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_imagefolder(root, classes=("cat", "dog", "3"), n_per_class=3, grayscale_some=True)
    return root


@pytest.fixture
def no_system_fashion(monkeypatch):
    """Hide a Debian copy of Fashion-MNIST, so only the files a test writes are found."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ("/nonexistent/fashion-mnist",))


def source_labels(subset) -> list:
    """The original label of every served sample, read from the wrapped dataset."""
    dataset = subset.dataset
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.tensors[1].tolist()
    else:
        labels = [dataset.classes[t] for t in labels] if isinstance(dataset, ImageFolder) else labels
    return [labels[i] for i in subset.indices]


def check_served(dm: ClassSplitDataModule, served: list, image_size: int) -> None:
    """Labels are 0..C-1 in the order of ``served``; images are (3, size, size) floats."""
    dm.setup()
    assert dm.num_classes == len(served)
    for subset in (dm.train_set, dm.eval_set):
        assert [served[k] for k in subset.labels] == source_labels(subset)
        assert set(subset.labels) == set(range(len(served)))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, image_size, image_size) and images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() < len(served)
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, image_size, image_size)


# ---------------------------------------------------------------- sources


def test_cifar10_target_split_remaps_in_given_order(cifar10_root):
    dm = ClassSplitDataModule(
        "cifar10",
        root=str(cifar10_root),
        base_classes=[0, 1, 2, 3, 4],
        target_classes=[9, 5, 7],
        split="target",
        batch_size=8,
    )
    check_served(dm, [9, 5, 7], 32)
    assert dm.class_names == ["truck", "dog", "horse"]
    assert len(dm.train_set) == 3 * 4 and len(dm.eval_set) == 3 * 4
    assert dm.mean == cifar10.BASE_MEAN


def test_cifar10_base_split_and_default_target(cifar10_root):
    base = ClassSplitDataModule("cifar10", root=str(cifar10_root), base_classes=[0, 1, 2, 3, 4], split="base")
    check_served(base, [0, 1, 2, 3, 4], 32)
    assert base.class_names == ["airplane", "automobile", "bird", "cat", "deer"]
    target = ClassSplitDataModule("cifar10", root=str(cifar10_root), base_classes=[0, 1, 2, 3, 4])
    assert target.class_names == ["dog", "frog", "horse", "ship", "truck"]


def test_cifar10_resized_when_image_size_differs(cifar10_root):
    dm = ClassSplitDataModule("cifar10", root=str(cifar10_root), target_classes=[1, 2], image_size=40)
    check_served(dm, [1, 2], 40)


def test_cifar100_fine_labels_base_split(cifar100_root):
    dm = ClassSplitDataModule(
        "cifar100",
        root=str(cifar100_root),
        base_classes=list(range(20, 100)),
        target_classes=list(range(20)),
        split="base",
        limit_per_class=1,
    )
    check_served(dm, list(range(20, 100)), 32)
    assert dm.class_names[0] == "chair" == dm.train_set.dataset.classes[20]
    assert len(dm.train_set) == 80 and len(dm.eval_set) == 160
    assert dm.mean == cifar100.BASE_MEAN


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_fashion_idx_files(tmp_path, no_system_fashion, gz, torchvision_layout):
    write_fashion_idx(tmp_path, n_per_class=3, gz=gz, torchvision_layout=torchvision_layout)
    dm = ClassSplitDataModule(
        "fashion_mnist", root=str(tmp_path), base_classes=[0, 1, 2, 3, 4], target_classes=[5, 6, 7, 8, 9], batch_size=4
    )
    check_served(dm, [5, 6, 7, 8, 9], 32)
    assert dm.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(dm.train_set) == 15
    images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


@pytest.mark.skipif(not Path(fashion_mnist.DEBIAN_DIR).is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_debian_copy_is_found_from_any_root(tmp_path):
    dm = ClassSplitDataModule(
        "fashion_mnist", root=str(tmp_path), target_classes=[5, 6], limit_per_class=10, eval_limit_per_class=10
    )
    check_served(dm, [5, 6], 32)
    assert len(dm.train_set.dataset) == 60000 and len(dm.eval_set.dataset) == 10000


def test_imagefolder_with_grayscale_images_and_numeric_names(folder_root):
    dm = ClassSplitDataModule(
        "imagefolder",
        root=str(folder_root),
        base_classes=["cat"],
        target_classes=["dog", 3],
        image_size=16,
        batch_size=4,
    )
    check_served(dm, ["dog", "3"], 16)
    assert dm.class_names == ["dog", "3"]
    assert dm.mean == (0.5, 0.5, 0.5)


def test_imagefolder_default_target_is_every_other_folder(folder_root):
    dm = ClassSplitDataModule("imagefolder", root=str(folder_root), base_classes=["cat"])
    assert dm.class_names == ["3", "dog"]  # ImageFolder's sorted order


def test_imagefolder_large_images_use_imagenet_pipeline(folder_root):
    dm = ClassSplitDataModule("imagefolder", root=str(folder_root), target_classes=["cat", "dog"], image_size=128)
    check_served(dm, ["cat", "dog"], 128)
    assert dm.mean == IMAGENET_MEAN


def test_digits_split_is_fixed_and_normalised():
    dm = ClassSplitDataModule("digits", base_classes=[0, 1, 2, 3, 4], split="base", seed=5)
    check_served(dm, [0, 1, 2, 3, 4], 32)
    other = ClassSplitDataModule("digits", base_classes=[0, 1, 2, 3, 4], split="base", seed=7)
    other.setup()
    assert dm.eval_set.indices == other.eval_set.indices
    assert dm.class_names == ["0", "1", "2", "3", "4"]
    images = torch.stack([dm.eval_set[i][0] for i in range(20)])
    assert images.min() >= -1 and images.max() <= 1


def test_limit_per_class_is_honoured_and_deterministic(cifar10_root):
    def make():
        dm = ClassSplitDataModule(
            "cifar10", root=str(cifar10_root), target_classes=[0, 3, 8], limit_per_class=2, eval_limit_per_class=3
        )
        dm.setup()
        return dm

    dm, again = make(), make()
    assert Counter(dm.train_set.labels) == {0: 2, 1: 2, 2: 2}
    assert Counter(dm.eval_set.labels) == {0: 3, 1: 3, 2: 3}
    assert dm.train_set.indices == again.train_set.indices


def test_loaders_shuffle_train_only(cifar10_root):
    dm = ClassSplitDataModule(
        "cifar10", root=str(cifar10_root), target_classes=list(range(10)), batch_size=100, augment=False
    )
    dm.setup()
    val_labels = next(iter(dm.val_dataloader()))[1].tolist()
    assert val_labels == dm.eval_set.labels == next(iter(dm.test_dataloader()))[1].tolist()
    train_labels = next(iter(dm.train_dataloader()))[1].tolist()
    assert sorted(train_labels) == sorted(dm.train_set.labels) and train_labels != dm.train_set.labels


def test_construction_reads_no_data(tmp_path):
    dm = ClassSplitDataModule("cifar10", root=str(tmp_path / "nowhere"), target_classes=[1])
    assert dm.num_classes == 1 and dm.class_names == ["automobile"]
    with pytest.raises(DataError):
        dm.setup()


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(target_classes=[]), ["target_classes", "empty"]),
        (dict(base_classes=[0, 1], target_classes=[1, 2]), ["share", "[1]"]),
        (dict(target_classes=[3, 10, -1]), ["[10, -1]", "0..9"]),
        (dict(target_classes=[2, 2]), ["more than once"]),
        (dict(target_classes=["cat"]), ["integer class ids"]),
        (dict(split="base"), ["base_classes"]),
        (dict(split="train"), ["'base'", "'target'"]),
        (dict(batch_size=0), ["batch_size"]),
        (dict(normalize_mean=[0.5]), ["three numbers"]),
    ],
)
def test_bad_config_raises_config_error(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ClassSplitDataModule("cifar10", root="unused", **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="cifar100"):
        ClassSplitDataModule("svhn")


def test_imagefolder_overlap_compares_names_as_strings():
    with pytest.raises(ConfigError, match="share"):
        ClassSplitDataModule("imagefolder", base_classes=[3], target_classes=["3", "dog"])


def test_missing_cifar_root_names_expected_files(tmp_path):
    dm = ClassSplitDataModule("cifar10", root=str(tmp_path), target_classes=[5, 6])
    with pytest.raises(DataError) as err:
        dm.setup()
    assert all(w in str(err.value) for w in ("data_batch_1", "test_batch", "data.root", "data.download=true"))


def test_cifar_dir_missing_one_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3 "):
        ClassSplitDataModule("cifar10", root=str(tmp_path), target_classes=[5]).setup()


def test_corrupt_cifar_pickle(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        ClassSplitDataModule("cifar10", root=str(tmp_path), target_classes=[5]).setup()


def test_missing_fashion_files_point_to_debian_package(tmp_path, no_system_fashion):
    with pytest.raises(DataError) as err:
        ClassSplitDataModule("fashion_mnist", root=str(tmp_path), target_classes=[5]).setup()
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and "dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message


def test_corrupt_fashion_file(tmp_path, no_system_fashion):
    write_fashion_idx(tmp_path, gz=True)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x09garbage")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is not a readable IDX file"):
        ClassSplitDataModule("fashion_mnist", root=str(tmp_path), target_classes=[5]).setup()


def test_missing_imagefolder_root(tmp_path):
    dm = ClassSplitDataModule("imagefolder", root=str(tmp_path / "mine"), target_classes=["cat"])
    with pytest.raises(DataError, match=r"train/<class>/\* and .*test/<class>/\*"):
        dm.setup()


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        _ = ClassSplitDataModule("imagefolder", root=str(tmp_path)).num_classes


def test_imagefolder_class_missing_lists_available(folder_root):
    dm = ClassSplitDataModule("imagefolder", root=str(folder_root), target_classes=["dog", "bird"])
    with pytest.raises(DataError) as err:
        dm.setup()
    assert "bird" in str(err.value) and "3, cat, dog" in str(err.value)


@pytest.mark.parametrize("image_size", [16, 128])
def test_corrupt_image_names_the_file(tmp_path, image_size):
    """Small images are decoded once, in setup(); large ones by the loader: either way, one DataError."""
    write_imagefolder(tmp_path, classes=("cat", "dog"), n_per_class=2)
    broken = tmp_path / "train" / "cat" / "cat_0.png"
    broken.write_bytes(b"this is not a png")
    dm = ClassSplitDataModule("imagefolder", root=str(tmp_path), target_classes=["cat", "dog"], image_size=image_size)
    with pytest.raises(DataError, match="cat_0.png"):
        dm.setup()
        list(dm.train_dataloader())


@pytest.mark.parametrize("name, layout", [("flowers102", "flowers-102"), ("pets", "oxford-iiit-pet")])
def test_missing_torchvision_sets_raise_data_error(tmp_path, name, layout):
    dm = ClassSplitDataModule(name, root=str(tmp_path))
    assert dm.num_classes == {"flowers102": 102, "pets": 37}[name]
    with pytest.raises(DataError, match=layout):
        dm.setup()
