"""Process memory: the resident set and peak memory. (glibc's handling of freed memory is a speed choice:
`speed.allocator`.)"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch


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
