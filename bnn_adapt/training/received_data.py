"""Reading dataset files that may come from someone else: nothing in them runs, nothing they declare is trusted.

CIFAR's python-format batches are pickles: :class:`CIFARUnpickler` admits only numpy's array reconstruction
(a pickle naming anything else, ``os.system`` and the like, is refused before it runs) and
:class:`RestrictedCIFAR` checks what comes out. Images open with Pillow's decompression-bomb limit, refused
above it (:func:`open_rgb`), and image folders are walked entering each real directory once
(:func:`walk_once`), so a symlink loop is followed once.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets as tvd
from torchvision.datasets.folder import has_file_allowed_extension

from bnn_adapt.errors import DataError, printable

log = logging.getLogger(__name__)


def _numpy_array(subtype, shape, dtype) -> np.ndarray:
    """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty array, that ``__setstate__`` then
    fills from the bytes the file holds (any other shape would allocate what the file merely declares)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("it rebuilds an array otherwise than numpy pickles one")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _plain_dtype(*args) -> np.dtype:
    """numpy's ``dtype`` for a pickled array, refusing object arrays (of Python objects: CIFAR holds bytes)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"it holds an array of Python objects (dtype {dtype}), not of pixels")
    return dtype


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode``, with which Python 3 pickles bytes at protocol 2: latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it encodes text as {encoding!r}, not latin-1")
    return text.encode("latin1")


_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


#: the only globals a CIFAR python-format file refers to: numpy arrays (numpy < 2 and >= 2 spell the module
#: differently) and, written by Python 3 at protocol 2, the encoding of bytes; builtin containers need none
CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1,
}


class CIFARUnpickler(pickle.Unpickler):
    """An unpickler that admits only :data:`CIFAR_GLOBALS`: a pickle that names anything else (``os.system``
    and the like, which unpickling would call) is refused before it runs."""

    def find_class(self, module: str, name: str):
        found = CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"it refers to {printable(module)[:80]}.{printable(name)[:80]}, which a CIFAR file never does "
                "(unpickling it could run code)"
            )
        return found


def read_cifar_pickle(path: Path) -> object:
    """One CIFAR python-format file, unpickled by :class:`CIFARUnpickler` (as torchvision's readers, latin-1
    for the Python 2 originals); anything wrong with it is one DataError naming it."""
    try:
        return CIFARUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - a damaged or crafted pickle raises errors of many kinds
        problem = printable(err)[:200] or type(err).__name__
        raise DataError(
            f"cannot read {path}: {problem}; replace it with the dataset's own file (data.download=true fetches it)"
        ) from None


class RestrictedCIFAR:
    """torchvision's CIFAR readers, loading through :func:`read_cifar_pickle` instead of ``pickle.load`` and
    checking what the files hold: pixel rows of 3 x 32 x 32 bytes and a label in range for each, and the class
    names. The attributes are torchvision's (``data`` as (N, 32, 32, 3) uint8, ``targets``, ``classes``)."""

    labels_key, class_count = "labels", 10

    def __init__(self, root, train: bool = True, transform=None, target_transform=None, download: bool = False):
        tvd.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        folder = Path(self.root) / self.base_folder
        self.classes = self._names(folder / self.meta["filename"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        batches = [self._batch(folder / name) for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([rows for rows, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for _, labels in batches for label in labels]

    def _names(self, path: Path) -> list[str]:
        meta = read_cifar_pickle(path)
        names = meta.get(self.meta["key"]) if isinstance(meta, dict) else None
        if not (isinstance(names, list) and len(names) == self.class_count and all(isinstance(n, str) for n in names)):
            raise DataError(
                f"{path} holds no list of {self.class_count} class names under {self.meta['key']!r}; replace it "
                "with the dataset's own file"
            )
        return names

    def _batch(self, path: Path) -> tuple[np.ndarray, list[int]]:
        entry = read_cifar_pickle(path)
        rows = entry.get("data") if isinstance(entry, dict) else None
        labels = entry.get(self.labels_key) if isinstance(entry, dict) else None
        if not (isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] == 3072):
            found = f"{rows.dtype} array of shape {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
            raise DataError(
                f"{path} holds no 'data' rows of 3072 bytes (uint8, N x 3072) but {found}; replace it with the "
                "dataset's own file"
            )
        in_range = isinstance(labels, list) and all(type(n) is int and 0 <= n < self.class_count for n in labels)
        if not in_range or len(labels) != len(rows):
            raise DataError(
                f"{path} holds no {self.labels_key!r} list of {len(rows)} labels in 0..{self.class_count - 1} (one "
                "per image); replace it with the dataset's own file"
            )
        return rows, labels


def open_rgb(path: str) -> Image.Image:
    """ImageFolder loader: any PIL-readable image as RGB; an unreadable file is a DataError naming it.

    The size an image declares is checked, from its header alone, against Pillow's decompression-bomb
    limit (``Image.MAX_IMAGE_PIXELS``) before anything is decoded: a small file declaring a huge image
    is refused, never inflated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, not just warned about
            with Image.open(path) as image:  # reads the header only
                limit, (width, height) = Image.MAX_IMAGE_PIXELS, image.size
                if limit and width * height > limit:
                    raise Image.DecompressionBombError(
                        f"it declares {width}x{height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = {limit}"
                    )
                return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DataError(f"image {path} is refused as a decompression bomb ({err}); delete or replace it.") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise many kinds on a damaged or crafted file
        raise DataError(f"cannot read image {path} ({type(err).__name__}: {err}); delete or replace the file.") from err


def _folder_id(path: str) -> tuple[int, int] | None:
    """What tells real directories apart, whatever the path to them: device and inode."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def walk_once(top: str, seen: set | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=True)``, entering each real directory once (``seen``: the folders not to
    enter, shared across walks): a link to one already entered, such as a symlink loop, is not followed
    again, with one warning naming it."""
    seen = set() if seen is None else seen
    seen.add(_folder_id(top))
    for folder, subfolders, files in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            path = os.path.join(folder, name)
            key = _folder_id(path)
            if key is not None and key in seen:
                shown, real = printable(path), printable(os.path.realpath(path))
                log.warning("%s leads to %s, a folder already read: not followed again (a symlink loop?)", shown, real)
                continue
            seen.add(key)
            kept.append(name)
        subfolders[:] = kept
        yield folder, subfolders, files


class OnceImageFolder(tvd.ImageFolder):
    """torchvision's ``ImageFolder``, walking each class folder with :func:`walk_once` (torchvision's walk
    follows links without end, so a symlink loop counted the same images again and again); a link to the
    root or to another class folder is not followed either."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        valid = is_valid_file or partial(has_file_allowed_extension, extensions=extensions)
        seen = {_folder_id(directory), *(_folder_id(os.path.join(directory, name)) for name in class_to_idx)}
        samples = [
            (path, class_to_idx[name])
            for name in sorted(class_to_idx)
            for folder, _, files in sorted(walk_once(os.path.join(directory, name), seen))
            for path in (os.path.join(folder, file) for file in sorted(files))
            if valid(path)
        ]
        found = {target for _, target in samples}
        empty = sorted(name for name, target in class_to_idx.items() if target not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"no images for the classes {', '.join(empty)}")
        return samples
