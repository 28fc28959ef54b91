"""What a run ran on, beyond its config: torch's thread count (``threads``, set here), the CPU
kernels torch picked, the CUDA build and the code's git commit, recorded in ``metrics.json``.

A run repeats bit for bit only with the same config, threads, package versions and machine
kind: the thread count changes the order in which floats are summed, which Adam and the
sign amplify (a base trained at 1 and at 2 threads differed in 46 of its 102 tensors after
one epoch), and torch picks its CPU kernels by the CPU's capability
(AVX2, AVX-512), which may sum in another order too.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch

from bnn_adapt.run.config import REPO_ROOT


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: torch's choice) and give the count back after,
    so the next job of a sweep in this process starts from torch's own choice again."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files), or None when
    the package does not run from a git checkout of its own (an installed wheel, no git)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        lines = top.stdout.split()
        if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != REPO_ROOT:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout.strip()
        return lines[1] + ("+dirty" if dirty else "")
    return None


def environment() -> dict:
    """What besides the config and the package versions decides a run's numbers to the bit."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
    }
