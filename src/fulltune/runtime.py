"""Device, precision, seeding, RNG state and distributed-rank helpers: everything about *where* a run executes.

Precision is decided here once (one autocast context, a grad scaler only for fp16), so the loop never branches on
dtypes itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fulltune.config import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"hardware.device is '{name}' but CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


def check_hardware(cfg: Any) -> None:
    """The configured device and precision exist on this machine: a one-line error before anything is written."""
    resolve_precision(cfg.hardware.mixed_precision, resolve_device(cfg.hardware.device))


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AVX512-BF16 or AMX); bf16 autocast is slower than fp32 elsewhere."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return sys.platform == "darwin"
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


@dataclass
class Precision:
    """The precision a run uses: the autocast dtype (None: plain fp32) and whether fp16 loss scaling is on."""

    name: str
    dtype: torch.dtype | None
    device_type: str
    note: str = ""
    """Why this precision, when the config's word alone does not say it (mixed_precision: true)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """auto -> bf16 where the hardware has it (CUDA with bf16, CPU with bf16 units), else fp32. amp (the seeds'
    `mixed_precision: true`, torch.cuda.amp) -> fp16 with a grad scaler on CUDA, bf16 where fp16 is not available."""
    note = ""
    if mode == "amp":
        if device.type == "cuda":
            mode, note = "fp16", " (mixed_precision: true as in the seeds: fp16 autocast + GradScaler)"
        else:
            mode, note = (
                "bf16",
                f" (mixed_precision: true as in the seeds means fp16, which needs CUDA: bf16 on {device.type})",
            )
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "bf16" if cpu_has_fast_bf16() else "no"
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("hardware.mixed_precision=fp16 (training.fp16) needs CUDA; use bf16 or no on this machine")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mode]
    return Precision(name=mode if dtype is not None else "fp32", dtype=dtype, device_type=device.type, note=note)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout draws from torch's global one)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to `device` (asynchronously where the source is pinned); other values stay."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if not is_distributed():
        return value
    on_gpu = dist.get_backend() == "nccl"
    t = torch.tensor([value], dtype=torch.int64, device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())
