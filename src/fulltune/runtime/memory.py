"""Process memory: the resident set, peak memory, and glibc's handling of freed memory on a CPU."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch

MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure_cpu(hardware: Any, device: torch.device) -> str:
    """Thread count and, for training on a CPU, glibc's handling of freed memory (`hardware.cpu_allocator`); returns
    what the log says about the allocator ('' when nothing changed).

    By default glibc serves each block over 32 MiB (and, by its sliding threshold, smaller ones) with its own mmap
    and returns it on free, and trims the heap's free top: every step then page-faults its gradients and
    activations in afresh (the embedding gradient of a 22.7M-parameter BERT alone, 47 MB, costs 12 ms to allocate
    and zero instead of 1 ms). With mmap off and trimming at most above 2 GiB of free top, freed blocks are reused."""
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    if hardware.cpu_allocator != "auto" or device.type != "cpu" or not sys.platform.startswith("linux"):
        return ""
    if any(k in os.environ for k in MALLOC_ENV):
        return "CPU allocator: glibc as set by MALLOC_* in the environment"
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own symbol: musl's mallopt does nothing of this
            return ""
        m_trim_threshold, m_mmap_max = -1, -4
        if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
            return ""
        global _malloc_trim
        _malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return ""
    return (
        "CPU allocator: freed memory kept for reuse (glibc: no mmap for large blocks, no trimming below 2 GiB; "
        "free pages handed back when the heap has grown)"
    )


HEAP_TRIM_EVERY = 64
"""Optimizer steps between two looks of `trim_heap` at the resident set."""


HEAP_GROWTH = 1.25
"""How much the resident set must have grown since the last trim for `trim_heap` to trim again."""


_malloc_trim: Any = None


_trimmed_rss = 0


def trim_heap(step: int) -> None:
    """Every `HEAP_TRIM_EVERY` steps, where `configure_cpu` set glibc up to keep freed memory and the resident set
    has grown by `HEAP_GROWTH` since the last trim: hand the pages of free blocks back to the system
    (`malloc_trim(0)`, between steps, when the step's temporaries are free).

    Without it the heap only grows: batches of ever new lengths leave free blocks that the next sizes do not fit,
    and the resident set creeps up (the demo's config, 120 steps: 2.95 GB peak, 2.61-2.66 GB trimming every 16
    steps). The pages handed back are faulted in again when reused: trimming every 16 steps cost up to 10% of the
    demo's speed (texts up to 128 tokens), so it is rare and only after growth."""
    global _trimmed_rss
    if _malloc_trim is None or step % HEAP_TRIM_EVERY:
        return
    rss = resident_bytes()
    if rss < _trimmed_rss * HEAP_GROWTH:
        return
    _malloc_trim(0)
    _trimmed_rss = resident_bytes()


def resident_bytes() -> int:
    """The process's resident set now (Linux /proc; 0 where that cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def maxrss_bytes(usage: Any = None) -> int:
    """`ru_maxrss` of a `resource.getrusage` result (this process's by default) in bytes: macOS reports bytes,
    Linux KiB."""
    usage = usage if usage is not None else resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated bytes on CUDA, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return maxrss_bytes()
