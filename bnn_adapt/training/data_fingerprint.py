"""Where a dataset's files are and a cheap fingerprint of them: what a result depends on beyond its config.

The config hash leaves ``paths`` out (and hashes ``data.root`` before interpolation), so
without this a sweep run again on another copy of the data, or after its files were
replaced, would find its results complete and skip them. The fingerprint
hashes every file's name, size and modification time, never its contents: one ``stat``
per file, cheap enough before every run and for every row of a table (Pets, the largest,
is about 18,000 files).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from stat import S_ISREG

from bnn_adapt.training.datasets import find
from bnn_adapt.training.received_data import walk_once


def dataset_files(name: str, root: str | None) -> tuple[Path, list[tuple[str, os.stat_result]]]:
    """The folder a dataset is read from (resolved) and its files there as its reader finds them (the
    dataset's ``files``): (name relative to the folder, stat), sorted by name."""
    folder, files = find(name).files(str(root))
    folder = Path(folder).resolve()
    if files is None:
        return folder, sorted(_walk(str(folder)))
    return folder, sorted((os.path.relpath(Path(f).resolve(), folder), Path(f).stat()) for f in files)


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
    embedded = find(name).embedded
    if embedded:
        return {"location": embedded, "files": 0, "fingerprint": None}
    folder, files = dataset_files(name, root)
    digest = hashlib.sha256()
    for relative, stat in files:
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"location": str(folder), "files": len(files), "fingerprint": digest.hexdigest()[:16]}
