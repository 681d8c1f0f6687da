"""This process's place in a distributed run (rank, world size, main process) and the few collectives the run
needs outside the model (barrier, broadcast of one integer); 1 and 0 outside torchrun."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
