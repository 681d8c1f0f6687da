"""Give back the resident pages of weights that a file mapping backs, once they are replaced; give weights that
training writes memory of their own.

`from_pretrained` maps safetensors files (private, copy-on-write) and its tensors point into the mapping; every
page read becomes resident and stays so until the whole file is unmapped, even after the tensor that used it is
gone. Pruning replaces most projection weights by smaller copies, so without this the process would hold the old
weights' pages as well as the new copies.

A weight that trains is written by the first optimizer step: in a private file mapping, each 4 KiB page then takes
a copy-on-write fault of its own, which makes the first step several times slower than one copy at load; and until
then the kernel would show the weight any later change to the file on disk. Measured: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _file_ranges() -> list[tuple[int, int]]:
    """[lo, hi) of every mapping of a regular file (not anonymous memory, heap or stack) in this process."""
    ranges = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _in_ranges(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= start and end <= hi for lo, hi in ranges)


def own_memory(model: torch.nn.Module, names: set[str]) -> int:
    """Copy the CPU parameters named in `names` that lie in a file mapping into memory of their own, and drop the
    mapped pages they leave; return how many bytes moved. For the weights that training will write (the file's
    copy-on-write faults would otherwise come one page at a time in the first optimizer step). Linux only.
    """
    if not sys.platform.startswith("linux"):
        return 0
    ranges, moved = _file_ranges(), 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.data
            if name not in names or t.device.type != "cpu" or t.numel() == 0:
                continue
            begin = t.data_ptr()
            if not _in_ranges(begin, begin + t.numel() * t.element_size(), ranges):
                continue
            p.data = t.clone()
            release_file_pages(t, ranges)
            moved += t.numel() * t.element_size()
    return moved


def release_file_pages(t: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> int:
    """Drop from the resident set the whole pages of `t`'s bytes that a file mapping backs; return how many bytes.

    Only pages entirely inside `t` are dropped, so a neighbouring tensor's bytes are never touched, and only in a
    file mapping: there a dropped page is read from the file again if anyone reads it, while anonymous memory would
    read back as zeros, so it is left alone. Call it for weights nothing will write or read again (the file's bytes
    are what a re-read returns). Linux only; elsewhere, and for CUDA or non-contiguous tensors, it does nothing.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return 0
    begin = t.data_ptr()
    start = -(-begin // _PAGE) * _PAGE  # round in to whole pages
    end = (begin + t.numel() * t.element_size()) // _PAGE * _PAGE
    if end <= start or not _in_ranges(start, end, _file_ranges() if ranges is None else ranges):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start
