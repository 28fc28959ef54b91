"""The source datasets: where their files are, how they are read, their classes and statistics.

Files are read with torchvision's dataset classes (CIFAR pickles, Fashion-MNIST
IDX, Flowers-102 and Pets layouts, image folders) or scikit-learn's bundled
digits; each reader returns ``(train, held-out)`` as a dataset and its
per-sample labels, read without decoding images (SPEC section 5). A missing or
malformed dataset is one :class:`~bnn_adapt.errors.DataError` naming the files.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file

from bnn_adapt.errors import DataError
from bnn_adapt.training.received_data import OnceImageFolder, RestrictedCIFAR, open_rgb

log = logging.getLogger(__name__)


# Folders searched for Fashion-MNIST after ``root`` (Debian: apt-get install dataset-fashion-mnist).
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_SYSTEM_DIRS: tuple[str, ...] = (DEBIAN_FASHION_DIR,)


FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


DIGITS_SPLIT_SEED = 0  # fixed, so every run sees the same held-out digits whatever its seed


LARGE_IMAGE_SIZE = 128  # imagefolder sets at least this big get the 224-px (ImageNet) pipeline


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


HALF = (0.5, 0.5, 0.5)


# Statistics of the base splits (SPEC section 5): CIFAR-10 labels 0-4, CIFAR-100 labels 20-99.
CIFAR10_BASE_MEAN, CIFAR10_BASE_STD = (0.4906, 0.4856, 0.4508), (0.2454, 0.2415, 0.2620)


CIFAR100_BASE_MEAN, CIFAR100_BASE_STD = (0.5034, 0.4852, 0.4427), (0.2684, 0.2562, 0.2766)


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


CIFAR100_CLASSES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)


PETS_CLASSES = (  # as torchvision.datasets.OxfordIIITPet names them, in label order
    "Abyssinian",
    "American Bulldog",
    "American Pit Bull Terrier",
    "Basset Hound",
    "Beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "Boxer",
    "British Shorthair",
    "Chihuahua",
    "Egyptian Mau",
    "English Cocker Spaniel",
    "English Setter",
    "German Shorthaired",
    "Great Pyrenees",
    "Havanese",
    "Japanese Chin",
    "Keeshond",
    "Leonberger",
    "Maine Coon",
    "Miniature Pinscher",
    "Newfoundland",
    "Persian",
    "Pomeranian",
    "Pug",
    "Ragdoll",
    "Russian Blue",
    "Saint Bernard",
    "Samoyed",
    "Scottish Terrier",
    "Shiba Inu",
    "Siamese",
    "Sphynx",
    "Staffordshire Bull Terrier",
    "Wheaten Terrier",
    "Yorkshire Terrier",
)


LabelledSet = tuple[Dataset, Sequence]  # a dataset and its per-sample labels, read without decoding images


@contextlib.contextmanager
def dataset_errors(problem: str):
    """Turn the errors torchvision and the file readers raise into one DataError naming the fix."""
    try:
        yield
    except (
        RuntimeError,
        OSError,
        urllib.error.URLError,
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        AssertionError,
    ) as err:
        raise DataError(f"{problem} ({type(err).__name__}: {err})") from err


def _why_download_failed(err: BaseException) -> str:
    """``no network: ...`` or what the server said, in a few words."""
    if isinstance(err, urllib.error.HTTPError):
        return f"the server answered HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"no network: {err.reason}"
    if isinstance(err, TimeoutError):
        return "no network: the connection timed out"
    text = str(err)
    if "urlopen error" in text:  # torchvision's MNIST readers wrap the URLError of every mirror in a RuntimeError
        return "no network: " + text.rsplit("urlopen error", 1)[1].split(">", 1)[0].strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def fetch_dataset(title: str, url: str, root: str, where: str, fetch: Callable[[], object]) -> None:
    """Run a torchvision download; a failure is one DataError saying so, naming the URL and where the
    files must go, and what the attempt created under ``root`` is removed again."""
    folder = Path(root)
    before = set(folder.rglob("*")) if folder.is_dir() else None
    try:
        fetch()
    except (OSError, RuntimeError, EOFError, ValueError, tarfile.TarError) as err:
        created = sorted(set(folder.rglob("*")) - (before or set()), reverse=True) if folder.is_dir() else []
        for path in created:  # deepest first: files, then the folders the attempt made
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        if before is None:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(
            f"downloading {title} from {url} failed ({_why_download_failed(err)}); download it where there is "
            f"network and {where}"
        ) from err


def _load_digits(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]; a stratified 25% is held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    return tuple(  # type: ignore[return-value]
        (TensorDataset(images[idx], labels[idx]), labels[idx].tolist()) for idx in (train_idx, eval_idx)
    )


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, which opens only uncompressed files."""
    with dataset_errors(f"{path} is not a readable IDX file; replace it"):
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path) as packed, tempfile.NamedTemporaryFile(suffix=".idx") as plain:
            shutil.copyfileobj(packed, plain)
            plain.flush()
            return reader(plain.name)


def _fashion_files(root: str) -> dict[str, Path] | None:
    """The four IDX files (plain or .gz) from the first folder that has them all."""
    folders = [Path(root), Path(root) / "FashionMNIST" / "raw", *map(Path, FASHION_SYSTEM_DIRS)]
    stems = [stem for pair in FASHION_FILES.values() for stem in pair]
    for folder in folders:
        found = {s: next((folder / n for n in (s, s + ".gz") if (folder / n).is_file()), None) for s in stems}
        if all(found.values()):
            if folder in map(Path, FASHION_SYSTEM_DIRS) and folder != Path(root):
                log.info("Fashion-MNIST not under %s; using the system copy in %s", root, folder)
            return found  # type: ignore[return-value]
    return None


def _fashion_missing(root: str) -> str | None:
    if _fashion_files(root) is not None:
        return None
    names = ", ".join(s for pair in FASHION_FILES.values() for s in pair)
    return f"Fashion-MNIST not found in {root} or {root}/FashionMNIST/raw: need {names} (plain or .gz)"


def _load_fashion(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """Fashion-MNIST from the standard IDX files: in root, root/FashionMNIST/raw/ or the Debian folder."""
    names = ", ".join(s for pair in FASHION_FILES.values() for s in pair)
    if download and _fashion_files(root) is None:
        fetch_dataset(
            "Fashion-MNIST",
            tvd.FashionMNIST.mirrors[0],
            root,
            f"put {names} (plain or .gz) into {root}, or apt-get install dataset-fashion-mnist",
            lambda: tvd.FashionMNIST(root, train=True, download=True),
        )
    files = _fashion_files(root)
    if files is None:
        raise DataError(
            _fashion_missing(root) + f"; set data.root={DEBIAN_FASHION_DIR} (apt-get install "
            "dataset-fashion-mnist) or data.download=true."
        )
    parts = []
    for image_stem, label_stem in FASHION_FILES.values():
        images = _read_idx(files[image_stem], read_image_file)
        labels = _read_idx(files[label_stem], read_label_file)
        if len(images) != len(labels):
            raise DataError(
                f"{files[image_stem]} holds {len(images)} images but {files[label_stem]} "
                f"{len(labels)} labels; replace the files."
            )
        parts.append((TensorDataset(images.unsqueeze(1), labels), labels.tolist()))
    return tuple(parts)  # type: ignore[return-value]


def _without_md5(cls: type[tvd.CIFAR10]) -> tuple[list, list, dict]:
    """File lists of a torchvision CIFAR class with the MD5 sums dropped: existing files pass."""
    return (
        [[name, None] for name, _ in cls.train_list],
        [[name, None] for name, _ in cls.test_list],
        {**cls.meta, "md5": None},
    )


class ExistingFilesCIFAR10(RestrictedCIFAR, tvd.CIFAR10):
    """torchvision's CIFAR-10 reader, accepting any files that exist (generated ones fail the MD5s)."""

    train_list, test_list, meta = _without_md5(tvd.CIFAR10)


class ExistingFilesCIFAR100(RestrictedCIFAR, tvd.CIFAR100):
    """torchvision's CIFAR-100 reader (fine labels), accepting any files that exist."""

    train_list, test_list, meta = _without_md5(tvd.CIFAR100)
    labels_key, class_count = "fine_labels", 100


class ExistingFilesFlowers102(tvd.Flowers102):
    """torchvision's Flowers-102 reader, accepting any ``.mat`` files that exist (generated ones fail the MD5s)."""

    _file_dict = {key: (name, None) for key, (name, _) in tvd.Flowers102._file_dict.items()}


def _cifar_missing(cls: type[tvd.CIFAR10], root: str) -> str | None:
    folder = Path(root) / cls.base_folder
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in expected if not (folder / name).is_file()]
    if not folder.is_dir():
        return f"{folder} does not exist (it must hold {', '.join(expected)})"
    return f"{folder} lacks {', '.join(missing)} (expected {', '.join(expected)})" if missing else None


def _load_cifar(cls: type[tvd.CIFAR10], root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """CIFAR-10/100 in the python-pickle format under root/<base_folder>/; eval = test set."""
    folder, missing = Path(root) / cls.base_folder, _cifar_missing(cls, root)
    if missing and download:
        title = cls.__name__.removeprefix("ExistingFiles").replace("CIFAR", "CIFAR-")
        fetch_dataset(
            title,
            cls.url,
            root,
            f"unpack {cls.filename} into {root}, so that {folder}/ holds its files",
            lambda: cls(root, train=True, download=True),
        )
    elif missing:
        raise DataError(f"{missing}; set data.root to the folder holding {cls.base_folder}/ or data.download=true.")
    with dataset_errors(f"cannot read {folder}; replace the files"):
        train = cls(root, train=True)
        test = cls(root, train=False)
    return (train, train.targets), (test, test.targets)


#: what torchvision's Flowers-102 and Pets readers need under root, and where they download from
LAYOUTS = {
    "flowers102": (
        "Flowers-102",
        "flowers-102",
        ("jpg", "imagelabels.mat", "setid.mat"),
        tvd.Flowers102._download_url_prefix,
    ),
    "pets": ("Oxford-IIIT Pets", "oxford-iiit-pet", ("images", "annotations"), tvd.OxfordIIITPet._RESOURCES[0][0]),
}


def _layout_missing(name: str, root: str) -> str | None:
    _, folder, parts, _ = LAYOUTS[name]
    missing = [p for p in parts if not (Path(root) / folder / p).exists()]
    return f"{Path(root) / folder} lacks {', '.join(missing)} (expected {', '.join(parts)})" if missing else None


def _load_torchvision_split(
    cls: type, splits: tuple[str, str], name: str, root: str, download: bool
) -> tuple[LabelledSet, LabelledSet]:
    """Flowers-102 / Oxford-IIIT Pets: torchvision's reader for the (train, eval) splits."""
    title, folder, parts, url = LAYOUTS[name]
    if download and _layout_missing(name, root):
        fetch_dataset(
            title,
            url,
            root,
            f"put {Path(root) / folder}/ ({', '.join(parts)}) there",
            lambda: cls(root, split=splits[0], download=True),
        )
    problem = (
        f"{title} not found: expected {Path(root) / folder}/{{{','.join(parts)}}}; "
        "set data.root=... or data.download=true"
    )
    with dataset_errors(problem):
        train, held_out = (cls(root, split=split) for split in splits)
    return (train, train._labels), (held_out, held_out._labels)


def imagefolder_dir(root: str, part: str) -> Path:
    folder = Path(root) / part
    if not folder.is_dir():
        raise DataError(
            f"imagefolder needs {root}/train/<class>/* and {root}/test/<class>/*, but {folder} is missing; "
            "set data.root=... to such a folder."
        )
    return folder


def _imagefolder_missing(root: str) -> str | None:
    missing = [part for part in ("train", "test") if not (Path(root) / part).is_dir()]
    return f"{root} lacks {' and '.join(p + '/<class>/' for p in missing)}" if missing else None


def _load_imagefolder(root: str, download: bool) -> tuple[LabelledSet, LabelledSet]:
    """The user's own root/train/<class>/* and root/test/<class>/*; labels are folder names."""
    parts = []
    for part in ("train", "test"):
        folder = imagefolder_dir(root, part)
        with dataset_errors(f"no images under {folder}/<class>/; add some or fix data.root"):
            dataset = OnceImageFolder(str(folder), loader=open_rgb, allow_empty=True)
        parts.append((dataset, [dataset.classes[t] for t in dataset.targets]))
    return tuple(parts)  # type: ignore[return-value]


def nothing_missing(root: str) -> None:
    """A dataset that needs no files (the digits ship with scikit-learn): nothing is ever missing.
    A module-level function, not a lambda: ``trainer=ddp`` (ddp_spawn) pickles the datamodule."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the datamodule needs to know about one source dataset."""

    title: str
    load: Callable[[str, bool], tuple[LabelledSet, LabelledSet]]
    class_names: tuple[str, ...] | None  # None: folder names, found on disk
    mean: tuple[float, ...] | None  # None: chosen by image size (imagefolder)
    std: tuple[float, ...] | None
    large: bool | None  # 224-px pipeline (rotation, resized crop, flips); None: by image size
    hflip: bool = False  # horizontal flips in the small-image pipeline (CIFAR)
    missing: Callable[[str], str | None] = nothing_missing  # what root lacks (reads nothing)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("scikit-learn digits", _load_digits, tuple(str(d) for d in range(10)), HALF, HALF, False),
    "fashion_mnist": DatasetSpec(
        "Fashion-MNIST",
        _load_fashion,
        tuple(tvd.FashionMNIST.classes),
        HALF,
        HALF,
        False,
        missing=_fashion_missing,
    ),
    "cifar10": DatasetSpec(
        "CIFAR-10",
        partial(_load_cifar, ExistingFilesCIFAR10),
        CIFAR10_CLASSES,
        CIFAR10_BASE_MEAN,
        CIFAR10_BASE_STD,
        False,
        hflip=True,
        missing=partial(_cifar_missing, ExistingFilesCIFAR10),
    ),
    "cifar100": DatasetSpec(
        "CIFAR-100",
        partial(_load_cifar, ExistingFilesCIFAR100),
        CIFAR100_CLASSES,
        CIFAR100_BASE_MEAN,
        CIFAR100_BASE_STD,
        False,
        hflip=True,
        missing=partial(_cifar_missing, ExistingFilesCIFAR100),
    ),
    "flowers102": DatasetSpec(
        "Flowers-102",
        partial(_load_torchvision_split, ExistingFilesFlowers102, ("train", "val"), "flowers102"),
        tuple(tvd.Flowers102.classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
        True,
        missing=partial(_layout_missing, "flowers102"),
    ),
    "pets": DatasetSpec(
        "Oxford-IIIT Pets",
        partial(_load_torchvision_split, tvd.OxfordIIITPet, ("trainval", "test"), "pets"),
        PETS_CLASSES,
        IMAGENET_MEAN,
        IMAGENET_STD,
        True,
        missing=partial(_layout_missing, "pets"),
    ),
    "imagefolder": DatasetSpec("imagefolder", _load_imagefolder, None, None, None, None, missing=_imagefolder_missing),
}
