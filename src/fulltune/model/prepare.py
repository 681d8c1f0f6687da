"""A model ready to train, as the trainer, the planner's dry run and the benches all get it: built, wrapped with
LoRA where the method asks, what trains decided, master weights where the dtype needs them, gradient
checkpointing, and the speed plan applied."""

from __future__ import annotations

import torch
from torch import nn

from fulltune.config import Config
from fulltune.model.build import build_model
from fulltune.model.bundle import ModelBundle
from fulltune.model.lora import LORA_METHODS, wrap_lora
from fulltune.model.trainable import TrainablePlan, plan_trainable
from fulltune.speed.plan import apply as apply_speed
from fulltune.speed.plan import plan as plan_speed


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward, with torch's non-reentrant checkpoint.

    Non-reentrant checkpointing gives gradients to parameters inside a block whether or not the block's input
    requires grad, so LoRA needs no `enable_input_require_grads`. transformers installs that hook on text models
    anyway; we remove it, because it makes the embedding output require grad and so runs backward through every
    frozen block below the trainable ones (a linear probe would pay for a full backward).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        model.disable_input_require_grads()


def master_weights(model: nn.Module, plan: TrainablePlan, cfg: Config) -> None:
    """fp32 master weights where standard mode needs them, whatever model.torch_dtype loaded.

    Standard mode steps fp32 weights (AdamW updates below bf16's resolution would round away): full / partial /
    linear-probe runs hold the whole model in fp32 (frozen blocks too, so that every layer's input has one dtype
    without autocast); LoRA / QLoRA upcast only what trains (adapters, the head) and keep the frozen base in its
    loaded dtype (bf16 halves it; 4-bit stays 4-bit). Lean mode keeps bf16 weights on purpose: nothing changes.
    """
    if cfg.training.memory == "lean" or cfg.model.torch_dtype == "float32":
        return
    if cfg.method.name not in LORA_METHODS:
        model.float()
        return
    for name, p in model.named_parameters():
        if name in plan.eligible and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def prepare_model(
    cfg: Config, task: str, labels: list[str] | None, device: torch.device
) -> tuple[ModelBundle, nn.Module, TrainablePlan]:
    """The model as training uses it: built, with gradient checkpointing (always in lean mode), LoRA adapters,
    lean mode's bf16 weights, on `device` (left where it is on the meta device), fp32 master weights where standard
    mode needs them, and the speed plan for `device` applied (`speed.plan`: CPU dropout, fused q/k/v, a first-token
    classifier's last layer for that token only, the weights that train in memory of their own, the thread count
    and the CPU allocator; `bundle.speed` holds what applied and why, and the heap trimmer); and the plan of what
    trains.

    The trainer, the memory planner's dry run and the benchmarks all call this, so they measure the same model.
    Returns (bundle, model, plan); `model` is `bundle.model` or its peft wrapper.
    """
    bundle = build_model(cfg, task, labels)
    model = bundle.model
    lean = cfg.training.memory == "lean"
    if cfg.training.gradient_checkpointing or lean:
        enable_gradient_checkpointing(model)
    if cfg.method.name in LORA_METHODS:
        model = wrap_lora(model, cfg, task)
    if lean:
        model.to(torch.bfloat16)
    if device.type != "meta":
        model.to(device)
    plan = plan_trainable(model, cfg)
    master_weights(model, plan, cfg)  # fp32 where standard mode trains (model.torch_dtype may load bf16)
    bundle.speed = apply_speed(model, plan_speed(cfg, device, task, model, trains=plan.eligible))
    return bundle, model, plan
