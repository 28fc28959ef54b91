"""Where a dataset's files are and a cheap fingerprint of them: what a result depends on beyond its config.

The config hash leaves ``paths`` out (and hashes ``data.root`` before interpolation), so
without this a sweep run again on another copy of the data, or after its files were
replaced, would find its results complete and skip them (issue 23). The fingerprint
hashes every file's name, size and modification time, never its contents: one ``stat``
per file, cheap enough before every run and for every row of a table (Pets, the largest,
is about 18,000 files).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from stat import S_ISREG

from bnn_adapt.training.datasets import LAYOUTS, ExistingFilesCIFAR10, ExistingFilesCIFAR100, _fashion_files
from bnn_adapt.training.received_data import walk_once

#: the dataset read from a package, not from files under ``data.root``
EMBEDDED = {"digits": "scikit-learn's bundled digits (sklearn.datasets.load_digits)"}


def dataset_files(name: str, root: str | None) -> tuple[Path, list[tuple[str, os.stat_result]]]:
    """The folder a dataset is read from (resolved) and its files there as the readers find them:
    (name relative to the folder, stat), sorted by name."""
    if name == "fashion_mnist":
        found = _fashion_files(str(root))  # root, root/FashionMNIST/raw or the Debian folder
        if found is None:
            return Path(root).resolve(), []
        files = sorted(path.resolve() for path in found.values())
        return files[0].parent, [(os.path.relpath(f, files[0].parent), f.stat()) for f in files]
    folders = {
        "cifar10": ExistingFilesCIFAR10.base_folder,
        "cifar100": ExistingFilesCIFAR100.base_folder,
        **{key: layout[1] for key, layout in LAYOUTS.items()},
    }
    folder = (Path(root) / folders.get(name, "")).resolve()  # imagefolder: root itself
    return folder, sorted(_walk(str(folder)))


def _walk(folder: str):
    """(name relative to ``folder``, stat) of every file under it, each real directory entered once."""
    for parent, _, names in walk_once(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                stat = os.stat(path)
            except OSError:  # a dangling link: no file the readers find
                continue
            if S_ISREG(stat.st_mode):
                yield os.path.relpath(path, folder), stat


def data_identity(name: str, root: str | None) -> dict:
    """``{"location", "files", "fingerprint"}`` of the dataset a run reads: the resolved folder,
    how many files it holds and a hash of their relative names, sizes and modification times."""
    if name in EMBEDDED:
        return {"location": EMBEDDED[name], "files": 0, "fingerprint": None}
    folder, files = dataset_files(name, root)
    digest = hashlib.sha256()
    for relative, stat in files:
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"location": str(folder), "files": len(files), "fingerprint": digest.hexdigest()[:16]}
