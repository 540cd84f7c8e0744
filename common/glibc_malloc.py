"""How glibc's malloc gives freed memory back to the system, set from within the process: a fixed mmap threshold
(what MALLOC_MMAP_THRESHOLD_ does from outside), or freed memory held for reuse up to a limit (`held_freed_memory`).

glibc serves an allocation at or above the threshold with a fresh mmap and hands it back to the system when it is
freed. By default the threshold is dynamic: each free of an mmapped block raises it to that block's size (up to
32 MiB), so that later blocks of that size come from the heap, where a freed block stays resident while anything
above it is live. A training loop over many batch shapes thus grows its resident memory all epoch (distill.py at
the settings of issue #10, whole epochs: 2.21-2.38 GiB at the epoch's end under the default, 2.08-2.09 with a 4 MiB
threshold, 1.55-1.58 with 1 MiB, each fixed threshold paying in page faults; README.md, distillation bench).
Setting the threshold with mallopt fixes it (and turns the dynamic adjustment off), as the environment variable
does.

A fixed threshold keeps memory down but pays in page faults: every large temporary of every micro-batch is mapped
and faulted in afresh. `held_freed_memory` does what PyTorch's CUDA caching allocator does with its
garbage-collection threshold instead: no block is mapped on its own and glibc never trims the heap by itself, so
freed memory stays in the process and the next micro-batch reuses it without a fault; only when resident memory
has grown past a limit over what it was once training settled (after the first optimizer step) is the free memory
handed back (malloc_trim, at a micro-batch boundary). distill.py at issue #10's settings, whole epochs: README.md,
distillation bench.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults (malloc.c)
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"
# glibc's own ways to set what hold_freed_memory sets: any of them in the environment and the user's setting wins
HOLD_ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", ENV_VAR)


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


def malloc_set_in_environment() -> list[str]:
    """The environment variables through which the user set what `held_freed_memory` would set (glibc's own
    MALLOC_* variables, or malloc tunables in GLIBC_TUNABLES)."""
    given = [name for name in HOLD_ENV_VARS if os.environ.get(name)]
    return given + (["GLIBC_TUNABLES"] if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") else [])


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeldMemory:
    """Freed memory held in the process for reuse (made by `held_freed_memory`), handed back above `limit` bytes
    over the run's settled resident memory: call `check` at each micro-batch boundary."""

    def __init__(self, libc: ctypes.CDLL, limit: int) -> None:
        self.libc, self.limit = libc, limit
        self.baseline: int | None = None
        self.handed_back = 0

    def check(self, settled: bool = True) -> None:
        """`settled`: the run's long-lived memory exists (the optimizer's state, after its first step). The first
        settled call hands back what getting there left free and takes the resident memory as the baseline; later
        calls hand the free memory back whenever resident memory exceeds the baseline by more than the limit."""
        if self.baseline is None:
            if settled:
                self.libc.malloc_trim(0)
                self.baseline = resident_bytes()
        elif resident_bytes() > self.baseline + self.limit:
            self.libc.malloc_trim(0)
            self.handed_back += 1

    def summary(self) -> dict[str, float | int | None]:
        return {"limit_mb": self.limit / 2**20, "baseline_mb": None if self.baseline is None else self.baseline / 2**20,
                "handed_back": self.handed_back}


@contextlib.contextmanager
def held_freed_memory(limit: int) -> Iterator[HeldMemory | None]:
    """Within the block glibc serves every block from the heap (no mmap of its own) and never trims the heap by
    itself, so that freed memory is reused without page faults; the HeldMemory yielded hands it back above `limit`
    bytes over the baseline. At the end glibc's default mmap count and trim threshold come back (fixed: its dynamic
    threshold stays off, as after any mallopt of either) and the free memory is handed back. Yields None,
    logged, when `limit` is 0, off glibc or Linux, or when glibc's malloc is set through the environment (the
    user's setting wins)."""
    libc = _glibc()
    given = malloc_set_in_environment()
    if limit == 0:
        held = None
    elif given:
        logger.info("malloc: %s from the environment wins; freed memory not held", ", ".join(given))
        held = None
    elif libc is None or not os.path.exists("/proc/self/statm"):
        logger.info("malloc: not glibc on Linux, freed memory not held (no effect here)")
        held = None
    else:
        libc.mallopt(ctypes.c_int(M_MMAP_MAX), ctypes.c_int(0))
        libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(-1))  # -1: never trim
        logger.info("malloc: freed memory held for reuse, handed back above %.0f MiB over the settled start of "
                    "training", limit / 2**20)
        held = HeldMemory(libc, limit)
    try:
        yield held
    finally:
        if held is not None:
            libc.mallopt(ctypes.c_int(M_MMAP_MAX), ctypes.c_int(DEFAULT_MMAP_MAX))
            libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(DEFAULT_TRIM_THRESHOLD))
            libc.malloc_trim(0)
