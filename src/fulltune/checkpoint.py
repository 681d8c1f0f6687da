"""Checkpoints: one folder is enough to resume (weights, optimizer, scaler, counters, RNG states, data position,
config) and is also an ordinary `save_pretrained` folder that plain transformers loads.

Every folder is written under a temporary name and renamed into place, so a crash mid-save never leaves a
half-written checkpoint under a final name, and never touches the previous good one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fulltune.config import Config, ConfigError, save_config, to_dict
from fulltune.models import ModelBundle, save_image_processor
from fulltune.runtime import rng_state, set_rng_state

STATE_DIR = "training_state"
RUN_META = "fulltune_run.json"


@dataclass
class TrainState:
    """Counters that say where a run is; saved as JSON in every checkpoint."""

    epoch: int = 0
    batches_done: int = 0
    """Micro-batches of the current epoch already consumed (a resume skips them)."""
    optimizer_step: int = 0
    micro_step: int = 0
    total_steps: int = 0
    samples_seen: int = 0
    micro_batch_size: int = 0
    """Micro-batch size and world size when saved: a resume on another world size converts batches_done."""
    world_size: int = 1
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(model: nn.Module, bundle: ModelBundle, out_dir: Path, meta: dict[str, Any],
                 model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a save_pretrained folder: LoRA adapters merged into a plain model, the adapter alone under adapter/.

    `model_state` is the full state dict gathered from a sharded (FSDP) model; one ordinary folder whatever the
    world size.
    """
    model = unwrap(model)
    if model_state is not None:
        model.save_pretrained(str(out_dir), state_dict=model_state)
    elif is_peft(model):
        model.save_pretrained(str(out_dir / "adapter"))
        plain = copy.deepcopy(model).merge_and_unload()
        plain.save_pretrained(str(out_dir))
        del plain
    else:
        model.save_pretrained(str(out_dir))
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(str(out_dir))
    if bundle.image_spec is not None:
        save_image_processor(bundle.image_spec, model.config, out_dir)
    from fulltune.prune import export_note

    note = export_note(model.config)  # a pruned model with per-layer widths: say how it loads
    if note:
        meta = {**meta, **note}
        (out_dir / "README.md").write_text("# fulltune export of a pruned model\n\n" + note["loading"] + "\n")
    (out_dir / RUN_META).write_text(json.dumps(meta, indent=2, default=str))


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {n: p.detach().contiguous().cpu() for n, p in unwrap(model).named_parameters() if id(p) in ids}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    bundle: ModelBundle,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any,
    state: TrainState,
    cfg: Config,
    meta: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    param_names: list[str] | None = None,
) -> None:
    """Write one checkpoint; `optimizer=None` writes an export only (best/). Rank 0 only; under FSDP the caller
    gathers `model_state` / `optimizer_state` (keyed by parameter name) on every rank first."""
    with atomic_dir(path) as tmp:
        export_model(model, bundle, tmp, meta, model_state)
        save_config(cfg, tmp / "config.yaml")
        if optimizer is None:
            return  # best/: an export, not a resume point
        sd = tmp / STATE_DIR
        sd.mkdir()
        if optimizer_state is not None:
            torch.save({"format": "by_name", "state": optimizer_state}, sd / "optimizer.pt")
        else:
            torch.save({"format": "by_index", "state": optimizer.state_dict(), "param_names": param_names}, sd / "optimizer.pt")
        torch.save({"rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}, sd / "rng.pt")
        if is_peft(unwrap(model)):
            # The merged export cannot be un-merged: keep the adapter-side tensors exactly as they train.
            save_file(_trainable_state(model, optimizer), str(sd / "trainable.safetensors"))
        (sd / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / STATE_DIR / "trainer_state.json").is_file()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint '{folder}' has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_weights(model: nn.Module, folder: Path) -> None:
    state = _read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not any(m.endswith(t) for t in tied)]
    if unexpected or missing:
        raise ConfigError(
            f"checkpoint '{folder}' does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> TrainState:
    """Restore weights, optimizer, scaler and RNG states in place; return the counters."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ConfigError(f"'{path}' is not a fulltune checkpoint (no {STATE_DIR}/trainer_state.json)")
    from fulltune import distributed as ddist

    sd = path / STATE_DIR
    base = unwrap(model)
    blob = torch.load(sd / "optimizer.pt", map_location="cpu", weights_only=False)
    if ddist.is_fsdp(base):
        if blob["format"] != "by_name":
            raise ConfigError(f"checkpoint '{path}' was not written by an FSDP run; resume it with parallel ddp or none")
        ddist.load_full_model_state(base, _read_weights(path))
        ddist.load_full_optimizer_state(base, optimizer, blob["state"])
    elif is_peft(base):
        missing, unexpected = base.load_state_dict(load_file(str(sd / "trainable.safetensors")), strict=False)
        if unexpected:
            raise ConfigError(f"checkpoint '{path}': adapter tensors do not fit this model ({unexpected[:5]})")
    else:
        _load_weights(base, path)
    if not ddist.is_fsdp(base):
        if blob["format"] == "by_name":  # written by an FSDP run: map names onto this optimizer
            ddist.load_full_optimizer_state(base, optimizer, blob["state"])
        else:
            optimizer.load_state_dict(blob["state"])
    blob = torch.load(sd / "rng.pt", weights_only=False)
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
    return TrainState(**json.loads((sd / "trainer_state.json").read_text()))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Resumable checkpoints in a run folder, oldest first (by optimizer step)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and is_checkpoint(p)]

    def step(p: Path) -> int:
        return json.loads((p / STATE_DIR / "trainer_state.json").read_text())["optimizer_step"]

    return sorted(found, key=lambda p: (step(p), p.stat().st_mtime))


def find_resume_point(resume: str, output_dir: Path) -> Path | None:
    """`--resume auto`: newest checkpoint in output_dir (None if there is none); a run folder: its newest; or a
    checkpoint folder itself."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if is_checkpoint(p):
        return p
    if p.is_dir():
        found = list_checkpoints(p)
        if found:
            return found[-1]
    raise ConfigError(f"--resume '{resume}': not a checkpoint folder, nor a run folder holding checkpoints")


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def run_meta(task: str, labels: list[str] | None, cfg: Config, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"task": task, "labels": labels, "method": cfg.method.name, "fulltune_config": to_dict(cfg)}
    meta.update(extra or {})
    return meta
