"""Optimizers and learning-rate schedules.

A schedule is a pure function of the optimizer step: each group's lr = base_lr * group['lr_scale'] * factor(step).
It multiplies the group's own scale (layer decay, head multiplier) and never overwrites it, and it needs no state
of its own to resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fulltune.config import TrainingConfig
from fulltune.training.lean import BF16AdamW, wants_compiled_step
from fulltune.training.lowbit import build_lowbit_optimizer


def build_optimizer(
    groups: list[dict[str, Any]], t: TrainingConfig, device: torch.device, lean: bool = False, fused: bool = True
) -> torch.optim.Optimizer:
    # Our bookkeeping keys ("names") are not optimizer hyper-parameters; keep them but out of the way.
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if lean and (t.lean_optimizer != "bf16_adamw" or t.lean_offload):
        return build_lowbit_optimizer(clean, t, device)
    if lean:
        compiled = wants_compiled_step(t.lean_compiled_step, sum(p.numel() for g in clean for p in g["params"]))
        return BF16AdamW(
            clean,
            lr=t.base_learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            state_dtype=t.lean_state_dtype,
            rounding=t.lean_rounding,
            seed=t.seed,
            compiled=compiled,
        )
    params = [p for g in clean for p in g["params"]]
    # Fused AdamW runs one kernel over all tensors (CPU and CUDA); sharded DTensors (FSDP) take the foreach path.
    fused = (
        fused
        and t.fused_optimizer
        and device.type in ("cuda", "cpu")
        and all(p.dtype.is_floating_point for p in params)
    )
    return torch.optim.AdamW(
        clean,
        lr=t.base_learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=fused or None,
    )


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` as a 0-d tensor (no host sync). Plain fp32 CPU tensors go through BLAS's dot
    product, 2x (large tensors) to 5x (small ones) faster than torch's norm kernel on CPU, which sums in double;
    anything else (CUDA, bf16, FSDP's DTensors) through `torch.nn.utils.get_total_norm`."""
    if grads and all(type(g) is torch.Tensor and g.device.type == "cpu" and g.dtype == torch.float32 for g in grads):
        flat = [g.reshape(-1) for g in grads]
        return torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None, max_grad_norm: float | None = None
) -> torch.Tensor | None:
    """One update after backward: unscale (fp16), clip the global gradient norm, step, free the gradients.

    Returns the gradient norm before clipping as a 0-d tensor (no host sync), or None when nothing clips.
    The trainer, the memory planner's dry run and the benchmarks all step through here.
    """
    norm = None
    # Fused AdamW divides every gradient by its `grad_scale` inside its one kernel (the hook GradScaler uses): the
    # clipping coefficient goes there, which saves a pass that scales every gradient.
    clip_in_kernel = scaler is None and type(optimizer) is torch.optim.AdamW and optimizer.defaults.get("fused")
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p for p in model.parameters() if p.grad is not None]
        if clip_in_kernel:
            norm = grad_norm([p.grad for p in grads])
            optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)  # clip_grad_norm_'s factor
        else:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
        optimizer.grad_scale = None
    optimizer.zero_grad(set_to_none=True)
    return norm


def warmup_steps(t: TrainingConfig, total_steps: int) -> int:
    if t.warmup_steps is not None:
        return min(t.warmup_steps, total_steps)
    return int(round(t.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for the update made at optimizer step `step` (0-based).

    Linear warmup from 1/(warmup+1) up to 1 over `warmup` steps, then cosine or linear decay to min_ratio.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def group_lrs(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> list[float]:
    """The learning rate of each param group at schedule `factor`: the base LR times the group's scale."""
    return [base_lr * group.get("lr_scale", 1.0) * factor for group in optimizer.param_groups]


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for group, lr in zip(optimizer.param_groups, group_lrs(optimizer, base_lr, factor), strict=True):
        group["lr"] = lr
