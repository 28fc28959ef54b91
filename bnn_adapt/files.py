"""Writing files so that no reader ever sees half of one, and reading files back, received ones included.

A file from someone else (a base checkpoint, a run folder) is data, never code:
:func:`load_weights` reads PyTorch files with ``weights_only=True`` (tensors and
plain containers only), and :func:`require_finite` refuses NaN and infinities
before they can binarise to +1 or spread through predictions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

from bnn_adapt.errors import UserError, printable


class WriteError(UserError, OSError):
    """A file could not be written (disk full, read-only, no permission): names the path and the cause."""

    def __str__(self) -> str:  # the one line alone, without OSError's "[Errno N]" before it
        return str(self.strerror)


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """One line for a failed write: the path, the cause in words and its errno name (ENOSPC, EROFS, ...)."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    cause = exc.strerror or str(exc)
    return WriteError(exc.errno, f"cannot write {path}: {cause}{f' ({code})' if code else ''}")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    A rename within one folder is atomic, so a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one. On error
    the temporary file is removed and ``path`` is untouched. The file gets the
    mode a plain ``open(path, "w")`` would give it (0o666 less the umask):
    writers of the temporary file (safetensors, ``tempfile``) may create it
    private (0600), and a rename keeps that mode.

    A failed write (a full or read-only disk) raises :class:`WriteError` naming
    ``path`` and the cause; cleaning up after it never hides that first error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        tmp.replace(path)
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
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


def load_weights(path: str | Path, what: str, fix: str, error: type[UserError] = UserError) -> object:
    """A PyTorch file's content, read as data only (``torch.load(weights_only=True)``: tensors, numbers,
    strings and plain containers; anything else is refused, as it could run code while it loads).
    ``what`` names the file in the one-line ``error``, ``fix`` says what to do instead."""
    import torch  # noqa: PLC0415

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and torch errors alike: the file is unreadable
        lines = [printable(line.strip()) for line in str(exc).splitlines() if line.strip()]  # names from the file
        found = next((line for line in lines if "GLOBAL" in line or "global" in line), "")
        if isinstance(exc, pickle.UnpicklingError) and found:  # weights_only refused a global: code to run
            raise error(
                f"{what} {path} holds more than tensors and plain values ({found}); it is refused, as "
                f"loading it could run code; {fix}"
            ) from None
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        first = next((line for line in lines if not line.startswith(boilerplate)), type(exc).__name__)
        raise error(f"{what} {path} is unreadable ({type(exc).__name__}: {first[:200]}); {fix}") from None


def require_finite(tensors: Mapping[str, object], source: str, error: type[UserError] = UserError) -> None:
    """Refuse NaN or infinite values in any floating tensor (or number) of ``tensors``, naming the first."""
    import torch  # noqa: PLC0415

    for name, value in tensors.items():
        if torch.is_tensor(value):
            bad = value.is_floating_point() and not bool(torch.isfinite(value).all())
        else:
            bad = isinstance(value, float) and not math.isfinite(value)
        if bad:
            raise error(
                f"{source}: tensor {name} holds NaN or infinite values; the file is damaged or was "
                "written from a diverged run: refused"
            )
