"""Data parallelism on torch.distributed: process-group start under torchrun, DDP or FSDP2 wrapping, full
(world-size independent) state dicts for checkpoints, and the `--nproc N` launcher.

The rest of fulltune never branches on how the model is wrapped: it asks this module for state dicts and lets
the sampler shard the data by rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fulltune.config import Config, ConfigError


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: Config, device: torch.device) -> bool:
    """Join the process group torchrun set up; True when this run is distributed."""
    if not launched_by_torchrun():
        if cfg.training.parallel != "none" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return False  # one plain process: nothing to wrap
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A bounded timeout: a rank that dies must not leave the others waiting forever in a collective.
        timeout = datetime.timedelta(seconds=int(os.environ.get("FULLTUNE_DIST_TIMEOUT", "300")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timeout)
        if dist.get_rank() == 0:
            print(f"process group: {backend}, world size {dist.get_world_size()}", flush=True)
    return True


def check_supported(cfg: Config) -> None:
    t = cfg.training
    if t.parallel == "fsdp" and t.memory == "lean":
        raise ConfigError(
            "training.memory=lean with training.parallel=fsdp is not supported (use ddp, or standard memory)"
        )
    if t.parallel == "fsdp" and cfg.method.name == "lora":
        raise ConfigError(
            "method.name=lora with training.parallel=fsdp is not supported yet (use ddp: LoRA states are small)"
        )
    if t.memory == "lean" and cfg.hardware.mixed_precision == "fp16":
        raise ConfigError(
            "training.memory=lean keeps weights in bf16: use hardware.mixed_precision=bf16 or auto, not fp16"
        )
    if t.parallel != "none" and t.compile:
        raise ConfigError("training.compile with training.parallel is not supported yet")


def unreached_parameters(model: nn.Module, loss_of: Any) -> set[str]:
    """Names of the parameters that `loss_of(model)` (a 0-d loss) does not depend on, read from the autograd graph of
    one forward with every parameter requiring grad (restored after), the RNG state untouched. A head that leaves
    part of its backbone out (CLIPForImageClassification averages the patch tokens and never uses the vision tower's
    post_layernorm) has such parameters: they never get a gradient, which plain DDP refuses."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    reached: set[int] = set()
    try:
        for p in params.values():
            p.requires_grad_(True)
        devices = [p.device for p in params.values() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices):
            loss = loss_of(model)
        stack, seen = [loss.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, "variable"):  # AccumulateGrad: a leaf, here a parameter
                reached.add(id(fn.variable))
            stack.extend(f for f, _ in fn.next_functions)
        del loss
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {n for n, p in params.items() if id(p) not in reached}


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP; with find_unused_parameters where the model has parameters the loss never reaches (see
    `unreached_parameters`, recorded by `wrap_model`): DDP then marks them ready itself on every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    unused = bool(getattr(model, "_fulltune_unreached", ()))
    return DDP(model, device_ids=ids, find_unused_parameters=unused)


def wrap_model(
    model: nn.Module,
    cfg: Config,
    device: torch.device,
    block_prefixes: list[str],
    precision: Any,
    probe: tuple[Any, dict[str, Any]] | None = None,
) -> nn.Module:
    """DDP, or FSDP2 with `fully_shard` on every transformer block and then the root. `probe`, a task's loss function
    and one example's batch, lets DDP find parameters that no loss reaches (`unreached_parameters`)."""
    if cfg.training.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
            if precision.dtype
            else MixedPrecisionPolicy()
        )
        for prefix in block_prefixes:
            fully_shard(model.get_submodule(_module_path(model, prefix)), mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if probe is not None:
        loss, batch = probe
        with precision.autocast():
            model._fulltune_unreached = sorted(unreached_parameters(model, lambda m: loss(m, batch, 0.0)[0]))
    return _ddp(model, device)


def _module_path(model: nn.Module, prefix: str) -> str:
    """Layer-map prefixes are parameter-name prefixes; peft adds base_model.model. in front of them."""
    names = dict(model.named_modules())
    if prefix in names:
        return prefix
    for name in names:
        if name.endswith("." + prefix):
            return name
    raise ConfigError(f"cannot find module '{prefix}' to shard")


def rewrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP fixes the set of parameters it all-reduces at construction: rebuild it when that set changes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return _ddp(model.module if isinstance(model, DDP) else model, device)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU (a collective under FSDP: every rank must call it)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """FSDP: the optimizer state keyed by parameter name, gathered in full (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over ranks (used at log points only)."""
    if not dist.is_initialized():
        return values
    out = values.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def launch(nproc: int, argv: list[str]) -> int:
    """`fulltune train --nproc N ...`: re-run the same command under torchrun on this node."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fulltune",
        *argv,
    ]
    print("launching: " + " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


def sync_context(model: nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce on accumulation micro-steps (DDP/FSDP)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    if not last_micro and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
