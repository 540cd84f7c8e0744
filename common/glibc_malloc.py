"""glibc's malloc mmap threshold, fixed from within the process (what MALLOC_MMAP_THRESHOLD_ does from outside).

glibc serves an allocation at or above the threshold with a fresh mmap and hands it back to the system when it is
freed. By default the threshold is dynamic: each free of an mmapped block raises it to that block's size (up to
32 MiB), so that later blocks of that size come from the heap, where a freed block stays resident while anything
above it is live. A training loop over many batch shapes thus grows its resident memory all epoch (distill.py at
the settings of issue #10, whole epochs: 2.21-2.38 GiB at the epoch's end under the default, 2.08-2.09 with a 4 MiB
threshold, 1.55-1.58 with 1 MiB, each fixed threshold paying in page faults; README.md, distillation bench).
Setting the threshold with mallopt fixes it (and turns the dynamic adjustment off), as the environment variable
does.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"


def threshold_problems(value: int, flag: str) -> list[str]:
    """What is wrong with `value` as a threshold in bytes (0: glibc's dynamic default)."""
    if not 0 <= value <= MAX_MMAP_THRESHOLD:
        return [f"{flag} must lie in [0, {MAX_MMAP_THRESHOLD}] bytes (0: glibc's dynamic default; got {value})"]
    return []


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def fix_mmap_threshold(value: int) -> int | None:
    """Fix glibc's mmap threshold at `value` bytes for the rest of the process (0: leave glibc's dynamic default).
    Returns the threshold set, or None when nothing was set: 0, not glibc, or MALLOC_MMAP_THRESHOLD_ set in the
    environment (the user's setting wins). Each case is logged."""
    if value == 0:
        logger.info("malloc: glibc's dynamic mmap threshold (off)")
        return None
    if os.environ.get(ENV_VAR):
        logger.info("malloc: %s=%s from the environment wins over the threshold of %d bytes", ENV_VAR,
                    os.environ[ENV_VAR], value)
        return None
    libc = _glibc()
    if libc is None:
        logger.info("malloc: not glibc, mmap threshold of %d bytes not set (no effect here)", value)
        return None
    if libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(value)) != 1:
        logger.warning("malloc: glibc refused an mmap threshold of %d bytes; its dynamic default stays", value)
        return None
    logger.info("malloc: glibc's mmap threshold fixed at %d bytes (%.1f MiB)", value, value / 2**20)
    return value
