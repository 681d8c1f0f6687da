"""Where a run executes and in what precision: the device, the autocast dtype (decided once: one autocast
context, a grad scaler only for fp16, so the loop never branches on dtypes), moving batches, unwrapping models."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from fulltune.config import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""The device kinds a run can train on; `meta` (shapes without data) and the rest torch names are not among them."""


def resolve_device(name: str = "auto", key: str = "hardware.device") -> torch.device:
    """The torch device `name` (auto: CUDA where there is one, else the CPU) names, present on this machine; anything
    else is a ConfigError naming `key` (hardware.device, or a command's --device) and the choices."""
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    choices = "auto, cpu, cuda, cuda:N, mps or xpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key} is {name!r}, not a device; use {choices}") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"{key} is {name!r}, a device fulltune cannot run on; use {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is '{name}' but CUDA is not available on this machine; use auto or cpu")
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else getattr(torch, device.type)
    if device.type != "cpu" and not backend.is_available():
        raise ConfigError(f"{key} is '{name}' but this machine has no {device.type} device; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} is '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


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
    """auto -> bf16 where the hardware has it (CUDA with bf16, CPU with bf16 units), else fp32. amp (`mixed_precision:
    true` as torch.cuda.amp scripts mean it) -> fp16 with a grad scaler on CUDA, bf16 where fp16 is not available."""
    note = ""
    if mode == "amp":
        if device.type == "cuda":
            mode, note = "fp16", " (mixed_precision: true as torch.cuda.amp means it: fp16 autocast + GradScaler)"
        else:
            mode, note = (
                "bf16",
                f" (mixed_precision: true means fp16 as in torch.cuda.amp, which needs CUDA: bf16 on {device.type})",
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
