"""What every dataset reader shares: one DataError for a file that cannot be read, and downloads that fail
in one line naming the URL and where the files must go."""

from __future__ import annotations

import contextlib
import pickle
import tarfile
import urllib.error
from collections.abc import Callable
from pathlib import Path

from bnn_adapt.errors import DataError


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
