"""Datasets copied from elsewhere: CIFAR pickles unpickled with only numpy's arrays admitted and checked
before use, and image folders with symlink loops read (and fingerprinted) once, each bad file one line."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
from torchvision import datasets as tvd

from bnn_adapt.errors import DataError
from bnn_adapt.training.data_fingerprint import data_identity
from bnn_adapt.training.datamodule import ClassSplitDataModule
from bnn_adapt.training.datasets import find
from bnn_adapt.training.datasets.cifar10 import ExistingFilesCIFAR10
from bnn_adapt.training.datasets.cifar100 import ExistingFilesCIFAR100
from tests.helpers.data import write_cifar10, write_cifar100, write_imagefolder


class RunsCode:
    """Unpickling this runs a shell command: what a crafted CIFAR batch does to ``pickle.load``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def load_cifar10(root) -> None:
    ClassSplitDataModule("cifar10", root=str(root), target_classes=[5, 6]).setup()


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_a_cifar_pickle_that_runs_code_is_refused_without_running_it(name, tmp_path):
    folder = write_cifar10(tmp_path, n_per_class=1)
    marker = tmp_path / "MARKER"
    (folder / name).write_bytes(pickle.dumps({"data": RunsCode(f"touch {marker}"), "labels": []}, protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert not marker.exists()
    message = str(err.value)
    assert str(folder / name) in message and "system" in message and "\n" not in message, message


def batch(rows, labels) -> dict:
    return {"batch_label": "crafted", "data": rows, "labels": labels, "filenames": []}


BAD_BATCHES = {
    "object array": batch(np.zeros((2, 3072), dtype=object), [0, 1]),
    "rows of another length": batch(np.zeros((2, 100), dtype=np.uint8), [0, 1]),
    "float pixels": batch(np.zeros((2, 3072), dtype=np.float32), [0, 1]),
    "a label out of range": batch(np.zeros((2, 3072), dtype=np.uint8), [0, 10]),
    "fewer labels than images": batch(np.zeros((2, 3072), dtype=np.uint8), [0]),
    "not a dict": [np.zeros((2, 3072), dtype=np.uint8)],
}


@pytest.mark.parametrize("content", list(BAD_BATCHES.values()), ids=list(BAD_BATCHES))
def test_a_cifar_batch_of_the_wrong_content_is_one_line_naming_it(content, tmp_path):
    folder = write_cifar10(tmp_path, n_per_class=1)
    (folder / "data_batch_2").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    message = str(err.value)
    assert str(folder / "data_batch_2") in message and "\n" not in message, message


def test_wrong_cifar100_class_names_are_one_line(tmp_path):
    folder = write_cifar100(tmp_path, n_per_class=1)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple"] * 99}, protocol=2))
    with pytest.raises(DataError) as err:
        ExistingFilesCIFAR100(str(tmp_path), train=True)
    assert str(folder / "meta") in str(err.value) and "100 class names" in str(err.value)


@pytest.mark.parametrize(
    ("ours", "torchvision_class"), [(ExistingFilesCIFAR10, tvd.CIFAR10), (ExistingFilesCIFAR100, tvd.CIFAR100)]
)
def test_real_format_cifar_loads_as_torchvisions_reader_loads_it(ours, torchvision_class, tmp_path):
    """The restricted reader gives what ``pickle.load`` gave: pixels, labels, class names, items."""
    (write_cifar10 if ours is ExistingFilesCIFAR10 else write_cifar100)(tmp_path, n_per_class=2)

    class Plain(torchvision_class):  # torchvision's own reader, without the MD5s generated files fail
        train_list, test_list, meta = ours.train_list, ours.test_list, ours.meta

    for train in (True, False):
        mine, theirs = ours(str(tmp_path), train=train), Plain(str(tmp_path), train=train)
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data)
        assert mine.targets == theirs.targets and mine.classes == theirs.classes
        assert mine.class_to_idx == theirs.class_to_idx and len(mine) == len(theirs)
        assert np.array_equal(np.asarray(mine[3][0]), np.asarray(theirs[3][0])) and mine[3][1] == theirs[3][1]


@pytest.fixture
def looped_tree(tmp_path):
    """An image folder (2 classes x 3 images per split) whose cat folder holds a link to itself."""
    root = write_imagefolder(tmp_path / "images", classes=("cat", "dog"), n_per_class=3)
    before = data_identity("imagefolder", str(root))
    loop = root / "train" / "cat" / "loop"
    os.symlink(root / "train" / "cat", loop)
    return root, loop, before


def test_an_image_folder_with_a_symlink_loop_counts_each_image_once(looped_tree, caplog):
    root, loop, _ = looped_tree
    with caplog.at_level(logging.WARNING):
        (train, labels), (test, _) = find("imagefolder").load(str(root), False)
    assert len(train) == 6 and sorted(labels) == ["cat"] * 3 + ["dog"] * 3 and len(test) == 6
    assert [r for r in caplog.records if str(loop) in r.getMessage()], caplog.text


def test_the_data_fingerprint_walks_a_symlink_loop_once(looped_tree, caplog):
    root, loop, before = looped_tree
    with caplog.at_level(logging.WARNING):
        assert data_identity("imagefolder", str(root)) == before  # the loop adds no files
    assert before["files"] == 12
    assert [r for r in caplog.records if str(loop) in r.getMessage()], caplog.text
