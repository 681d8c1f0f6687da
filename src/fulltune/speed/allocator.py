"""glibc's handling of freed memory for training on a CPU: keep it for reuse, and hand it back between steps only
when the heap has grown.

By default glibc serves each block over its mmap threshold (32 MiB at most, by its sliding threshold smaller ones
too) with a mapping of its own and returns it on free, and trims the heap's free top: every step then page-faults
its gradients and activations in afresh, and zeroes them. With mmap off for large blocks and trimming only above
2 GiB of free top, freed blocks are reused and those faults are gone. The cost is that the heap only grows: batches
of ever new lengths leave free blocks that the next sizes do not fit, so `HeapTrim` hands their pages back now and
then, between steps. What both buy, measured: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

from fulltune.runtime.memory import resident_bytes

MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
"""Environment variables through which a user sets glibc's malloc up: where any is set, fulltune leaves it alone."""

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
"""glibc's `mallopt` parameters (malloc.h)."""

TRIM_THRESHOLD = 2**31 - 1
"""The free top of the heap that glibc keeps before trimming it on its own."""

HEAP_TRIM_EVERY = 64
"""Optimizer steps between two looks of `HeapTrim` at the resident set."""

HEAP_GROWTH = 1.25
"""How much the resident set must have grown since the last trim for `HeapTrim` to trim again."""


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (Linux), else None (musl's `mallopt` does none of this)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None


def set_by_environment() -> bool:
    """Whether the user set glibc's malloc up through `MALLOC_*` variables (which then win)."""
    return any(k in os.environ for k in MALLOC_ENV)


class HeapTrim:
    """Called after each optimizer step: every `every` steps, where the resident set has grown by `growth` since the
    last trim, hands the pages of free heap blocks back to the system (`malloc_trim(0)`, between steps, when the
    step's temporaries are free). Made by `keep_freed_memory`; `HeapTrim(None)` does nothing (glibc's defaults trim
    on their own).

    The pages handed back come back as page faults when reused, so the trim is rare and only after growth."""

    def __init__(
        self, malloc_trim: Callable[[int], int] | None, every: int = HEAP_TRIM_EVERY, growth: float = HEAP_GROWTH
    ) -> None:
        self.malloc_trim, self.every, self.growth = malloc_trim, every, growth
        self.trimmed_rss = 0
        """The resident set right after the last trim (0: none yet)."""

    @property
    def active(self) -> bool:
        return self.malloc_trim is not None

    def __call__(self, step: int) -> bool:
        """Trim if `step` is on the interval and the heap has grown; True if it trimmed."""
        if self.malloc_trim is None or step % self.every:
            return False
        if resident_bytes() < self.trimmed_rss * self.growth:
            return False
        self.malloc_trim(0)
        self.trimmed_rss = resident_bytes()
        return True


def keep_freed_memory() -> HeapTrim:
    """Set glibc up to keep freed memory for reuse (no mmap for large blocks, no trimming below `TRIM_THRESHOLD`);
    return the `HeapTrim` that hands free pages back when the heap has grown. Where this is not glibc, or glibc
    refuses the settings, nothing changes and the `HeapTrim` does nothing."""
    libc = glibc()
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return HeapTrim(None)
    return HeapTrim(libc.malloc_trim)
