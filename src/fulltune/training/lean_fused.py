"""Lean mode's optimizer step fused into backward: each parameter is updated, and its gradient freed, as soon as its
gradient is final, so all gradients never coexist; when training fuses it, and the log line that says how lean
mode runs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from fulltune.runtime.device import cpu_has_fast_bf16
from fulltune.runtime.ranks import world_size
from fulltune.training.lean_tied import TiedEmbeddingStep, tied_embeddings, tied_step_blocker


class FusedStepHandle:
    """Result of `attach_fused_step`: hook handles plus counters the training loop reads.

    step_count: backward passes that applied at least one update (the loop's "optimizer steps").
    param_updates: per-parameter updates applied so far.
    found_nonfinite: per device, a bool tensor set (without host sync) when any gradient had a NaN/inf;
        sticky until `reset_nonfinite()`. The affected tensors are already updated when it is read, so a set
        flag means the weights are poisoned: stop or reload a checkpoint. `nonfinite()` reads it (one sync).
    tied: the step of a tied embedding/head weight in vocabulary chunks (`lean_tied.TiedEmbeddingStep`), or None;
        tied_note says which, for the log ('' when the model ties nothing).
    """

    def __init__(
        self, model: nn.Module, optimizer: Any, *, per_param_max_norm: float | None, check_finite: bool
    ) -> None:
        self.step_count = 0
        self.param_updates = 0
        self.found_nonfinite: dict[torch.device, Tensor] = {}
        self._optimizer = optimizer
        self._max_norm = per_param_max_norm
        self._check_finite = check_finite
        self._hooks: list[Any] = []
        self._group_index: dict[int, int] = {}
        self._seen: set[int] = set()
        self._graph_task: int | None = None
        self._model_ref = weakref.ref(model)
        self.tied: TiedEmbeddingStep | None = None
        self.tied_note = ""

    def arm(self) -> None:
        """Called as each update of a backward starts: the first queues the end-of-backward callback."""
        task_id = getattr(torch._C, "_current_graph_task_id", lambda: None)()
        if self._graph_task is None:
            self._graph_task = task_id if task_id is not None else -1
            # runs once when this backward finishes: count the step, re-arm the per-backward guards
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        elif task_id is not None and task_id != self._graph_task:
            self._reset()  # the end-of-backward callback will not run once this raises
            raise RuntimeError(
                "fused optimizer step saw a nested backward (reentrant gradient checkpointing?): enable "
                "checkpointing with use_reentrant=False (transformers' default) to use attach_fused_step"
            )

    def check_finite(self, p: Tensor, grad: Tensor) -> None:
        """Set the device's non-finite flag if `grad` (a gradient or part of one) has a NaN/inf."""
        if not self._check_finite:
            return
        flag = self.found_nonfinite.get(p.device)
        if flag is None:
            flag = self.found_nonfinite[p.device] = torch.zeros((), dtype=torch.bool, device=p.device)
        # a sum is NaN/inf iff some element is (or it overflows, itself a red flag); no n-byte mask needed.
        # Summed in the gradient's own dtype (CPU and CUDA accumulate bf16 in fp32): sum(dtype=float32)
        # first made an fp32 copy, 2x the gradient's bytes, the largest temporary of the whole step.
        flag.logical_or_(~torch.isfinite(grad.sum()))

    def _hook(self, p: Tensor) -> None:
        self.arm()
        if id(p) in self._seen:
            self._reset()
            raise RuntimeError(
                "a parameter's gradient was accumulated twice in one backward (reentrant checkpointing?); "
                "its first update used a partial gradient"
            )
        self._seen.add(id(p))
        grad = p.grad
        self.check_finite(p, grad)
        if self._max_norm is not None:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            grad.mul_(torch.clamp(self._max_norm / (norm + 1e-6), max=1.0))
        # look the group up by index every time: load_state_dict replaces the group dicts
        self._optimizer.step_param(p, self._optimizer.param_groups[self._group_index[id(p)]])
        p.grad = None  # the point of fusing: this gradient's memory is free before the next one is computed
        self.param_updates += 1

    def _reset(self) -> None:
        self._seen.clear()
        self._graph_task = None

    def _end_backward(self) -> None:
        if self.tied is not None:
            self.tied.end_backward()
        self.step_count += 1
        # the fused updates are this optimizer's step: tell torch LR schedulers (which otherwise warn that
        # scheduler.step() ran before optimizer.step()); optimizer step hooks do not fire in fused mode
        self._optimizer._opt_called = True
        self._reset()

    def nonfinite(self) -> bool:
        """True if any gradient since the last reset had a NaN/inf (syncs with the device once)."""
        return any(bool(flag) for flag in self.found_nonfinite.values())

    def reset_nonfinite(self) -> None:
        for flag in self.found_nonfinite.values():
            flag.zero_()

    def remove(self) -> None:
        """Detach every hook; afterwards backward leaves `.grad` as usual and `optimizer.step()` works again."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.tied is not None:
            self.tied.remove()
            self.tied = None
        model = self._model_ref()
        if model is not None and getattr(model, "_fulltune_fused_step", None) is self:
            del model._fulltune_fused_step


def attach_fused_step(
    model: nn.Module,
    optimizer: Any,
    *,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    per_param_max_norm: float | None = None,
    check_finite: bool = True,
) -> FusedStepHandle:
    """Fuse the optimizer step into backward: each parameter is updated, and its `.grad` freed, as soon as
    its gradient is final (`Tensor.register_post_accumulate_grad_hook`), so all gradients never coexist.

    The loop then does `loss.backward()` only: no `optimizer.step()`, no `zero_grad()`; the scheduler may
    keep calling `scheduler.step()` after each backward (hooks read the group's current `lr`).

    - Only parameters with `requires_grad=True` get a hook; frozen ones are untouched. Every trainable
      parameter must belong to `optimizer` (its gradient would otherwise never be freed).
    - `optimizer` must offer `step_param(p, group)` (`BF16AdamW` and `LowBitAdamW` do; bitsandbytes' do not).
    - Gradient accumulation is impossible: a gradient is consumed and freed at the end of every backward.
      `accumulation_steps > 1` raises ValueError (use a larger batch, or the normal step path).
    - Global-norm clipping is impossible: the norm needs every gradient before the first update. Passing
      `max_grad_norm` raises ValueError. The documented substitute is `per_param_max_norm`: each tensor's
      gradient is scaled so that its own L2 norm is <= the value (clips less than a global norm would).
    - Gradient checkpointing must be non-reentrant (transformers' default); a nested backward raises.
    - `check_finite` keeps a NaN/inf flag per device, see `FusedStepHandle`.
    - Attach after freezing and after `add_param_group`: hooks cover the trainable parameters of that moment.
      Optimizer step hooks never fire (there is no `step()` call); `handle.step_count` counts the steps.
    """
    if accumulation_steps != 1:
        raise ValueError(
            f"fused optimizer step cannot accumulate gradients (accumulation_steps={accumulation_steps}): each "
            "gradient is applied and freed during its own backward. Use accumulation_steps=1 with a larger "
            "batch, or turn the fused step off."
        )
    if max_grad_norm is not None:
        raise ValueError(
            "global-norm gradient clipping needs all gradients before any update, which the fused step never "
            "has; pass per_param_max_norm (per-tensor clipping) instead, or turn the fused step off"
        )
    if per_param_max_norm is not None and per_param_max_norm <= 0:
        raise ValueError(f"per_param_max_norm must be > 0, got {per_param_max_norm}")
    if not callable(getattr(optimizer, "step_param", None)):
        name = type(optimizer).__name__
        raise TypeError(f"{name} has no step_param(p, group); use BF16AdamW or LowBitAdamW for a fused step")
    existing = getattr(model, "_fulltune_fused_step", None)
    if existing is not None:
        raise RuntimeError("this model already has a fused optimizer step attached; remove() it first")

    handle = FusedStepHandle(model, optimizer, per_param_max_norm=per_param_max_norm, check_finite=check_finite)
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            handle._group_index[id(p)] = i
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in handle._group_index]
    if orphans:
        raise ValueError(f"trainable parameters missing from the optimizer: {orphans[:5]}")
    tied = tied_embeddings(model)
    if tied is not None and tied[0].weight.requires_grad:
        unit = optimizer.range_unit(tied[0].weight) if callable(getattr(optimizer, "range_unit", None)) else 0
        blocker = tied_step_blocker(*tied, unit, per_param_max_norm)
        if blocker:
            handle.tied_note = f"; the tied embedding's whole gradient is held till the lookup's backward ({blocker})"
        else:
            handle.tied = TiedEmbeddingStep(*tied, handle)
            handle.tied_note = "; the tied embedding is stepped in vocabulary chunks as the head's backward runs"
    for p in model.parameters():  # named_parameters dedups tied weights, so one hook per tensor
        if p.requires_grad and (handle.tied is None or p is not handle.tied.weight):
            handle._hooks.append(p.register_post_accumulate_grad_hook(handle._hook))
    model._fulltune_fused_step = handle
    return handle


def fuses_step(t: Any, optimizer: Any, parallel: str = "none") -> bool:
    """Whether training fuses the optimizer step into backward (`t`: the TrainingConfig): in lean mode, with an
    optimizer that steps one tensor at a time, no gradient accumulation and one process (the trainer and the
    memory planner both ask here)."""
    return (
        t.memory == "lean"
        and t.lean_fused_step
        and callable(getattr(optimizer, "step_param", None))
        and parallel == "none"
        and t.gradient_accumulation_steps == 1
    )


def describe_lean_mode(t: Any, device: torch.device, fused: Any, optimizer: Any = None) -> str:
    """The log line that says how lean mode runs here (`t`: the TrainingConfig; `fused`: the fused step's
    `FusedStepHandle`, or a bool), or '' outside lean mode."""
    if t.memory != "lean":
        return ""
    if t.lean_optimizer == "bf16_adamw":
        how = f"bf16 weights, AdamW moments {t.lean_state_dtype}, {t.lean_rounding} rounding, gradient checkpointing"
    elif t.lean_optimizer == "paged_adamw8bit":
        how = "bf16 weights, bitsandbytes' paged 8-bit AdamW, gradient checkpointing"
    else:
        bits = t.lean_optimizer.removeprefix("adamw").replace("bit", "-bit")
        how = f"bf16 weights, torchao's {bits} AdamW moments, {t.lean_rounding} rounding, gradient checkpointing"
    if t.lean_offload:
        how += ", optimizer state and update on the CPU (gradients copied off the device during backward)"

    if getattr(optimizer, "compiled", False):
        how += ", compiled update kernel"
    if device.type == "cpu" and not cpu_has_fast_bf16():
        how += " (this CPU has no bf16 units: bf16 matmuls are emulated and several times slower than fp32)"
    if fused:
        clip = f"; max_grad_norm {t.max_grad_norm} clips each tensor's gradient" if t.max_grad_norm else ""
        tied = getattr(fused, "tied_note", "")
        return f"memory lean: {how}, optimizer step fused into backward{clip}{tied}\n"
    if t.lean_offload:
        why = "the offloaded optimizer steps on the CPU after backward; max_grad_norm clips each tensor's gradient"
    elif t.lean_optimizer == "paged_adamw8bit":
        why = "bitsandbytes steps every tensor in one step(); it has no public per-tensor step"
    elif t.gradient_accumulation_steps > 1 or world_size() > 1:
        why = "gradient accumulation and data parallelism need whole gradients"
    else:
        why = "training.lean_fused_step=false"
    return f"memory lean: {how}; optimizer step after backward ({why})\n"
