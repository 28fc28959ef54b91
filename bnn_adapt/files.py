"""Writing files so that no reader ever sees half of one, and reading result files back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    A rename within one folder is atomic, so a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one. On error
    the temporary file is removed and ``path`` is untouched. The file gets the
    mode a plain ``open(path, "w")`` would give it (0o666 less the umask):
    writers of the temporary file (safetensors, ``tempfile``) may create it
    private (0600), and a rename keeps that mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, payload: dict) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return Path(path)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_json_or_none(path: str | Path) -> dict | None:
    """A result file's content, or None when it is absent or unreadable."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (a base checkpoint), or None when there is none."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
