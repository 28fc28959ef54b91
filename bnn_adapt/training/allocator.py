"""Host-memory allocator settings for CPU training (glibc ``mallopt``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves
blocks above its mmap threshold (at most 32 MiB, raised dynamically) with a
fresh ``mmap`` and returns them to the OS on free, so every step of a model
whose activations exceed that size (a 64x160x32x32 fp32 map is 42 MB) pays
page faults and kernel zeroing for each of them again; :func:`keep_freed_memory`
keeps them, which speeds up memory-bound steps such as UDTA's from cached taps
(docs/speed.md; compute-bound finetuning is unaffected). Intel's PyTorch tuning guide makes the
same point with jemalloc/tcmalloc; these settings need no preloading.

The price: memory freed by one step stays with the process for the next one
(the resident set stays at its peak), which is what a training loop wants.
No effect where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 1 << 32  # keep up to 4 GiB of freed heap instead of returning it
TOP_PAD = 256 << 20  # grow the heap in 256 MiB steps


def _mallopt(option: int, value: int) -> bool:
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(option, value))
    return False


def keep_freed_memory() -> bool:
    """Serve large tensors from a heap that keeps freed blocks; True if glibc took it."""
    return all(
        _mallopt(option, value)
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )


def return_freed_memory(mmap_threshold: int = 128 * 1024) -> bool:
    """Blocks from ``mmap_threshold`` up get their own mapping, returned to the OS
    when freed, so the resident set follows the live tensors (for measuring peaks)."""
    return _mallopt(M_MMAP_THRESHOLD, mmap_threshold) and _mallopt(M_TRIM_THRESHOLD, mmap_threshold)
