"""Checkpoints: one folder is enough to resume (weights, optimizer, scaler, counters, RNG states, data position,
config) and is also an ordinary `save_pretrained` folder that plain transformers loads.

Every folder is written under a temporary name and renamed into place, so a crash mid-save never leaves a
half-written checkpoint under a final name, and never touches the previous good one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fulltune.config import Config, save_config, to_dict
from fulltune.data.multilabel import write_thresholds
from fulltune.errors import ConfigError, TrainingError
from fulltune.files.manifest import (
    RUN_META,
    STATE_DIR,
    DamagedCheckpoint,
    listed_files,
    verify_checkpoint,
    write_manifest,
)
from fulltune.files.rundir import (
    atomic_dir,
    fsync_dir,
    kill_point,
    recover_run_dir,
)
from fulltune.files.safestate import (
    StateFileError,
    load_state,
    load_tensors,
    read_json,
    save_state,
)
from fulltune.model.bundle import ModelBundle, save_image_processor
from fulltune.model.lora import is_quantized, merged_state_dict
from fulltune.model.pruned import export_note
from fulltune.runtime import distributed as ddist
from fulltune.runtime.device import unwrap
from fulltune.runtime.ranks import barrier, broadcast_int, rank
from fulltune.runtime.rng import rng_state, set_rng_state
from fulltune.state.modelcard import training_length, write_model_card
from fulltune.state.resume import check_fits
from fulltune.state.sharded import SHARDED_DIR, export_from_shards, load_sharded_state, save_sharded_state


@dataclass
class TrainState:
    """Counters that say where a run is; saved as JSON in every checkpoint."""

    epoch: int = 0
    batches_done: int = 0
    """Micro-batches of the current epoch already consumed (a resume skips them)."""
    optimizer_step: int = 0
    total_steps: int = 0
    samples_seen: int = 0
    micro_batch_size: int = 0
    """Micro-batch size and world size when saved: a resume on another world size converts batches_done."""
    world_size: int = 1
    best_metric: float | None = None
    best_loss: float | None = None
    """Validation loss at best_step: breaks a tie on best_metric (see `metrics.improves`)."""
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)
    """The run's data fingerprint (`resume.data_fingerprint`): a resume on other data is refused."""


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def export_model(
    model: nn.Module,
    bundle: ModelBundle,
    out_dir: Path,
    meta: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    shards: Path | None = None,
) -> None:
    """Write a save_pretrained folder: LoRA adapters merged into a plain model, the adapter alone under adapter/.

    `model_state` is the full state dict gathered from a sharded (FSDP) model; one ordinary folder whatever the
    world size.
    """
    model = unwrap(model)
    if shards is not None:  # FSDP's sharded training state: weights consolidated file by file, nothing gathered
        model.config.save_pretrained(str(out_dir))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(out_dir))
        export_from_shards(shards, out_dir)
    elif model_state is not None:
        model.save_pretrained(str(out_dir), state_dict=model_state)
    elif is_peft(model):
        model.save_pretrained(str(out_dir / "adapter"))
        if is_quantized(model):  # a 4-bit base merges through peft (dequantize, add, quantize) on a copy
            plain = copy.deepcopy(model).merge_and_unload()
            plain.save_pretrained(str(out_dir))
            del plain
        else:  # merged on the CPU tensor by tensor: no second copy of the model on the device
            model.get_base_model().save_pretrained(str(out_dir), state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(str(out_dir))
    kill_point("inside-export")
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(str(out_dir))
        write_training_length(out_dir, meta)
    if bundle.image_spec is not None:
        save_image_processor(bundle.image_spec, model.config, out_dir)

    note = export_note(model.config)  # a pruned model with per-layer widths: say how it loads
    if note:
        meta = {**meta, **note}
        (out_dir / "README.md").write_text("# fulltune export of a pruned model\n\n" + note["loading"] + "\n")
    (out_dir / RUN_META).write_text(json.dumps(meta, indent=2, default=str))
    write_thresholds(out_dir, meta)  # a multi-label run's per-label thresholds tuned on validation
    write_model_card(out_dir, meta)


def write_training_length(folder: Path, meta: dict[str, Any]) -> None:
    """Set tokenizer_config.json's model_max_length to the training length, so that `truncation=True` in plain
    transformers (a pipeline or tokenizer call) cuts a text where training cut it, not at the base model's limit."""
    length, path = training_length(meta), Path(folder) / "tokenizer_config.json"
    if length is None or not path.is_file():
        return
    try:
        settings = read_json(path)
    except StateFileError as err:
        raise ConfigError(f"export: {err}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"export: '{path}' is not a JSON object (a tokenizer's settings)")
    settings["model_max_length"] = length
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
    sharded_dir: Path | None = None,
) -> None:
    """Write one checkpoint; `optimizer=None` writes an export only (best/). Rank 0 only; under FSDP the caller
    gathers `model_state` / `optimizer_state` (keyed by parameter name) on every rank first, or every rank has
    written its shards into `sharded_dir` (fulltune.state.sharded), which moves into the checkpoint.

    No pickle: the optimizer and RNG states are safetensors + JSON (see safestate.py), and a manifest of every
    file's size and SHA-256 is written last, so a load can tell a complete checkpoint from a damaged one."""
    with atomic_dir(path) as tmp:
        export_model(model, bundle, tmp, meta, model_state, shards=sharded_dir)
        save_config(cfg, tmp / "config.yaml")
        if optimizer is not None:
            state_dir = tmp / STATE_DIR
            state_dir.mkdir()
            if sharded_dir is not None:  # FSDP: every rank's rows, written by fulltune.state.sharded
                shutil.move(str(sharded_dir), str(state_dir / SHARDED_DIR))
                blob = {"format": "sharded"}
            elif optimizer_state is not None:
                blob = {"format": "by_name", "state": optimizer_state}
            else:
                blob = {"format": "by_index", "state": optimizer.state_dict(), "param_names": param_names}
            save_state(blob, state_dir, "optimizer")
            kill_point("inside-save")
            save_state(
                {"rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}, state_dir, "rng"
            )
            if is_peft(unwrap(model)):
                # The merged export cannot be un-merged: keep the adapter-side tensors exactly as they train.
                save_file(_trainable_state(model, optimizer), str(state_dir / "trainable.safetensors"))
            (state_dir / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        write_manifest(tmp)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / STATE_DIR / "trainer_state.json").is_file()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = listed_files(folder, "*.safetensors")
    if not files:
        raise ConfigError(f"checkpoint '{folder}' has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_tensors(f))
        except StateFileError as err:
            raise DamagedCheckpoint(f"checkpoint '{folder}': {err}") from None
    return state


def _load_weights(model: nn.Module, folder: Path) -> None:
    state = _read_weights(folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape, from a size `check_fits` does not know by name
        found = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ConfigError(f"checkpoint '{folder}' does not fit this model: {(found or [str(err)])[0]}") from None
    if (missing or unexpected) and hasattr(model, "from_pretrained"):
        # transformers saves some families (ViT in v5) under their legacy parameter names: let it map them back.
        loaded, info = type(model).from_pretrained(
            str(folder), config=model.config, use_safetensors=True, output_loading_info=True
        )
        if info["missing_keys"] or info["mismatched_keys"]:  # it filled them randomly: no resume of these weights
            missing, unexpected = list(info["missing_keys"]) + [k for k, *_ in info["mismatched_keys"]], unexpected
        else:
            missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        del loaded
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not any(m.endswith(t) for t in tied)]
    if unexpected or missing:
        raise ConfigError(
            f"checkpoint '{folder}' does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _check_fits(path: Path, model: nn.Module) -> None:
    """The model fits the checkpoint (`resume.check_fits`), its config.json read or named as damaged."""
    hf = model.get_base_model() if is_peft(model) else model
    if getattr(hf, "config", None) is None:
        return
    try:
        saved = read_json(path / "config.json")
    except StateFileError as err:
        raise DamagedCheckpoint(f"checkpoint '{path}': {err}") from None
    check_fits(path, hf, saved)


def _read_state(state_dir: Path, name: str, path: Path) -> Any:
    try:
        return load_state(state_dir, name)
    except StateFileError as err:
        raise DamagedCheckpoint(f"checkpoint '{path}': {err}") from None


def read_train_state(path: Path) -> TrainState:
    f = Path(path) / STATE_DIR / "trainer_state.json"
    try:
        saved = read_json(f)
        known = {field.name for field in fields(TrainState)}  # counters this version no longer keeps are ignored
        return TrainState(**{k: v for k, v in saved.items() if k in known})
    except StateFileError as err:
        raise DamagedCheckpoint(f"checkpoint '{path}': {err}") from None
    except (TypeError, AttributeError):
        raise DamagedCheckpoint(f"checkpoint '{path}': '{f}' does not hold fulltune's training counters") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> TrainState:
    """Restore weights, optimizer, scaler and RNG states in place; return the counters. Nothing is unpickled."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ConfigError(f"'{path}' is not a fulltune checkpoint (no {STATE_DIR}/trainer_state.json)")
    verify_checkpoint(path)

    state_dir = path / STATE_DIR
    base = unwrap(model)
    _check_fits(path, base)
    blob = _read_state(state_dir, "optimizer", path)
    formats = ("by_name", "by_index", "sharded")
    if (
        not isinstance(blob, dict)
        or blob.get("format") not in formats
        or ("state" not in blob) != (blob["format"] == "sharded")
    ):
        raise DamagedCheckpoint(
            f"checkpoint '{path}': '{state_dir / 'optimizer.json'}' does not hold an optimizer state"
        )
    rng = _read_state(state_dir, "rng", path)
    if not isinstance(rng, dict) or "rng" not in rng:
        raise DamagedCheckpoint(f"checkpoint '{path}': '{state_dir / 'rng.json'}' does not hold RNG states")
    train_state = read_train_state(path)
    if blob["format"] == "sharded":  # any world size reads its own rows
        load_sharded_state(state_dir / SHARDED_DIR, base, optimizer)
    elif ddist.is_fsdp(base):
        if blob["format"] != "by_name":
            raise ConfigError(
                f"checkpoint '{path}' was not written by an FSDP run; resume it with parallel ddp or none"
            )
        ddist.load_full_model_state(base, _read_weights(path))
        ddist.load_full_optimizer_state(base, optimizer, blob["state"])
    elif is_peft(base):
        try:
            adapter = load_tensors(state_dir / "trainable.safetensors")
        except StateFileError as err:
            raise DamagedCheckpoint(f"checkpoint '{path}': {err}") from None
        missing, unexpected = base.load_state_dict(adapter, strict=False)
        if unexpected:
            raise ConfigError(f"checkpoint '{path}': adapter tensors do not fit this model ({unexpected[:5]})")
    else:
        _load_weights(base, path)
    try:
        if not ddist.is_fsdp(base) and blob["format"] != "sharded":
            if blob["format"] == "by_name":  # written by an FSDP run: map names onto this optimizer
                ddist.load_full_optimizer_state(base, optimizer, blob["state"])
            else:
                optimizer.load_state_dict(blob["state"])
        if scaler is not None and rng.get("scaler") is not None:
            scaler.load_state_dict(rng["scaler"])
        set_rng_state(rng["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"checkpoint '{path}': its optimizer or RNG state does not fit this run ({err})") from None
    return train_state


def _step_of(p: Path) -> int:
    try:
        return int(read_json(p / STATE_DIR / "trainer_state.json")["optimizer_step"])
    except (StateFileError, KeyError, TypeError, ValueError):
        m = re.fullmatch(r"checkpoint-step-(\d+)", p.name)
        return int(m[1]) if m else -1


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Resumable checkpoints in a run folder, oldest first (by optimizer step); temporary folders never count."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and is_checkpoint(p)]
    return sorted(found, key=lambda p: (_step_of(p), p.stat().st_mtime))


def _newest_good(found: list[Path]) -> Path | None:
    for p in reversed(found):
        try:
            verify_checkpoint(p)
            read_train_state(p)
        except DamagedCheckpoint as err:
            print(f"warning: skipping damaged checkpoint {p}: {err}", flush=True)
            continue
        return p
    return None


def find_resume_point(resume: str, output_dir: Path) -> Path | None:
    """`--resume auto`: newest good checkpoint in output_dir (None if there is none; damaged ones are skipped with a
    warning); a run folder: its newest good one; or a checkpoint folder itself (verified: damage is an error)."""
    if resume == "auto":
        if int(os.environ.get("RANK", "0")) == 0:  # one process repairs; the others only read
            recover_run_dir(output_dir)
        found = list_checkpoints(output_dir)
        point = _newest_good(found)
        if point is None and found:
            raise DamagedCheckpoint(f"--resume auto: every checkpoint in '{output_dir}' is damaged (see the warnings)")
        return point
    p = Path(resume)
    if is_checkpoint(p):
        verify_checkpoint(p)
        read_train_state(p)
        return p
    if p.is_dir():
        found = list_checkpoints(p)
        if found:
            point = _newest_good(found)
            if point is None:
                raise DamagedCheckpoint(f"--resume '{resume}': every checkpoint in it is damaged (see the warnings)")
            return point
    raise ConfigError(f"--resume '{resume}': not a checkpoint folder, nor a run folder holding checkpoints")


def delete_old_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints. Each is first renamed to a temporary name, so a kill
    during the deletion never leaves a half-deleted folder that looks like a checkpoint."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        doomed = old.parent / f".{old.name}.del-{os.getpid()}"
        old.rename(doomed)
        fsync_dir(old.parent)
        kill_point("deleting-old")
        shutil.rmtree(doomed, ignore_errors=True)


def read_run_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's run record (fulltune_run.json); {} when it has none that parses."""
    try:
        meta = json.loads((Path(folder) / RUN_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_meta(task: str, labels: list[str] | None, cfg: Config, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"task": task, "labels": labels, "method": cfg.method.name, "fulltune_config": to_dict(cfg)}
    meta.update(extra or {})
    return meta


def convert_position(state: TrainState, micro: int, world: int, point: Path) -> int:
    """Batches already done this epoch, in this run's batch size and world size (the global batch must match)."""
    saved_micro, saved_world = state.micro_batch_size or micro, state.world_size or 1
    if saved_micro * saved_world != micro * world:
        raise TrainingError(
            f"checkpoint '{point}' was written with a global batch of {saved_micro} x {saved_world} processes; "
            f"this run has {micro} x {world}: set data.batch_size so that the global batch is the same"
        )
    state.micro_batch_size, state.world_size = micro, world
    return state.batches_done


def staging_dir(path: Path) -> Path:
    """Where every rank writes its shards before rank 0 moves them into `path`: `.NAME.shards.tmp-PID` with rank 0's
    pid, so that start-up recovery (`rundir.recover_run_dir`) removes it once that process is gone (a kill inside
    the save), as it removes every other temporary folder of a save."""
    return path.parent / f".{path.name}.shards.tmp-{broadcast_int(os.getpid())}"


def save_fsdp_checkpoint(
    path: Path,
    model: nn.Module,
    bundle: Any,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    state: Any,
    cfg: Any,
    meta: dict[str, Any],
) -> None:
    """One FSDP checkpoint (a collective: every rank calls it). checkpoint.fsdp_state=sharded: all ranks write their
    shards into a staging folder beside `path`, then rank 0 writes the rest (export consolidated from the shards,
    config, counters, RNG) and moves the shards in. full: the whole model and optimizer state are gathered to rank
    0, which writes them (what fulltune did before; kept for comparison and for old readers)."""

    if cfg.checkpoint.fsdp_state == "full":
        full_model = ddist.full_model_state(model)
        full_optim = ddist.full_optimizer_state(model, optimizer)
        if rank() == 0:
            save_checkpoint(
                path,
                model,
                bundle,
                optimizer,
                scaler,
                state,
                cfg,
                meta,
                model_state=full_model,
                optimizer_state=full_optim,
            )
        barrier()
        return
    staging = staging_dir(path)
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    save_sharded_state(staging, model, optimizer)
    barrier()
    if rank() == 0:
        try:
            save_checkpoint(path, model, bundle, optimizer, scaler, state, cfg, meta, sharded_dir=staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
