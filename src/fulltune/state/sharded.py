"""Sharded training state under FSDP: every rank writes its own slice of the weights and of the optimizer state, and
a resume on any world size (FSDP on N ranks, DDP, one plain process) reads back the rows it owns.

Layout, inside a checkpoint's training_state/sharded/:
  model-rank{r}.safetensors, optim-rank{r}.safetensors   rank r's local shards, keyed "model/<fqn>" and
                                                          "optim/<fqn>/<state key>"
  index-rank{r}.json                                      per key: the file, the global shape, and the rows
                                                          [start, stop) of dimension 0 that rank r holds (null:
                                                          the whole tensor)
Nothing here is pickled: torch.distributed.checkpoint's FileSystemReader unpickles its `.metadata` file, so its own
format is not used. FSDP2 shards dimension 0 like torch.chunk; a rank that owns no rows writes none.

The Hugging Face export of a sharded checkpoint is consolidated from these files by rank 0, one output file of at
most `export_file_bytes` at a time, so no process ever holds the whole model or optimizer state while saving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fulltune.config import ConfigError
from fulltune.runtime.ranks import rank, world_size

FORMAT = "fulltune-sharded-v1"
SHARDED_DIR = "sharded"


def _dtensor_types() -> tuple[Any, Any]:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int | None, int | None, bool]:
    """(local tensor, start row, stop row, whether this rank writes it): a Shard(0) DTensor's slice on this rank; a
    replicated or plain tensor whole, written by rank 0 only."""
    DTensor, Shard = _dtensor_types()
    if isinstance(t, DTensor):
        local = t.to_local()
        placements = t.placements
        if len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0:
            mesh = t.device_mesh
            total, world, me = t.shape[0], mesh.size(), mesh.get_local_rank()
            chunk = math.ceil(total / world) if total else 0
            start = min(me * chunk, total)
            stop = min(start + chunk, total)
            if local.shape[0] != stop - start:
                raise RuntimeError(
                    f"unexpected FSDP shard: {local.shape[0]} rows on rank {me}, expected {stop - start}"
                )
            return local, start, stop, stop > start
        if all(p.is_replicate() for p in placements):
            return local, None, None, rank() == 0
        raise RuntimeError(f"sharded checkpoints support Shard(0) and Replicate placements, not {placements}")
    return t, None, None, rank() == 0


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Keyed by parameter name; creates the state (zeros) when the optimizer has not stepped yet."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def _flat_optim(osd: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                yield f"optim/{fqn}/{k}", v


def _write(items: Iterator[tuple[str, torch.Tensor]], file: Path, index: dict[str, Any]) -> None:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in items:
        local, start, stop, mine = _rows_of(t)
        if not mine:
            continue
        local = local.detach().to("cpu").contiguous()
        ptr = local.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights share storage: safetensors wants each tensor once
            local = local.clone()
        seen.add(local.untyped_storage().data_ptr())
        out[key] = local
        index[key] = {
            "file": file.name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "start": start,
            "stop": stop,
        }
    save_file(out, str(file))


def save_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (a collective: all ranks call it;
    `folder` must exist and be empty on a file system that every rank sees)."""
    me, world = rank(), world_size()
    index: dict[str, Any] = {}
    _write(((f"model/{k}", v) for k, v in _model_state(model).items()), folder / f"model-rank{me}.safetensors", index)
    _write(_flat_optim(_optim_state(model, optimizer)), folder / f"optim-rank{me}.safetensors", index)
    meta = {"format": FORMAT, "world_size": world, "rank": me, "tensors": index}
    (folder / f"index-rank{me}.json").write_text(json.dumps(meta, indent=1))


class ShardReader:
    """Reads any row range of any saved tensor from the per-rank files, opening each file once (lazily, by slices)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        metas = [json.loads(p.read_text()) for p in sorted(self.folder.glob("index-rank*.json"))]
        if not metas or any(m.get("format") != FORMAT for m in metas):
            raise ConfigError(f"'{self.folder}' holds no {FORMAT} index files")
        world = metas[0]["world_size"]
        if sorted(m["rank"] for m in metas) != list(range(world)):
            raise ConfigError(f"'{self.folder}': expected the index files of {world} ranks, found {len(metas)}")
        self.pieces: dict[str, list[dict[str, Any]]] = {}
        for m in metas:
            for key, entry in m["tensors"].items():
                self.pieces.setdefault(key, []).append(entry)
        self.saved_world_size = world
        self._files: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        if name not in self._files:
            self._files[name] = safe_open(str(self.folder / name), framework="pt")
        return self._files[name]

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.pieces if k.startswith(prefix)]

    def shape(self, key: str) -> list[int]:
        return self.pieces[key][0]["shape"]

    def read_rows(self, key: str, start: int | None, stop: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of dimension 0 (None, None: the whole tensor), copied piece by piece into `out` (a new
        tensor when None), so no second full-size copy is made."""
        if key not in self.pieces:
            raise ConfigError(f"sharded checkpoint '{self.folder}' has no tensor '{key}'")
        shape = self.shape(key)
        if out is None:
            rows = shape[:1] if start is None else [stop - start]
            out = torch.empty(rows + shape[1:], dtype=_dtype(self, key))
        if not shape:  # a 0-dim tensor, saved whole
            return out.copy_(self._file(self.pieces[key][0]["file"]).get_tensor(key))
        if start is None:
            start, stop = 0, shape[0]
        covered = start
        for p in sorted(self.pieces[key], key=lambda p: p["start"] or 0):
            lo, hi = (0, shape[0]) if p["start"] is None else (p["start"], p["stop"])
            a, b = max(lo, covered), min(hi, stop)
            if a > covered:
                break
            if a < b:
                out[a - start : b - start].copy_(self._file(p["file"]).get_slice(key)[a - lo : b - lo])
                covered = b
        if covered < stop:
            raise ConfigError(f"sharded checkpoint '{self.folder}': rows {covered}..{stop} of '{key}' are missing")
        return out


def _fill(target: torch.Tensor, reader: ShardReader, key: str) -> None:
    """Copy the saved values of `key` into `target` in place: a DTensor's local rows, or a whole tensor."""
    local, start, stop, _ = _rows_of(target)
    if list(target.shape) != reader.shape(key):
        raise ConfigError(
            f"sharded checkpoint '{reader.folder}': '{key}' has shape {reader.shape(key)}, "
            f"this run's is {list(target.shape)}"
        )
    if local.numel() == 0:
        return
    with torch.no_grad():
        if local.is_contiguous() and local.device.type == "cpu":
            reader.read_rows(key, start, stop, out=local)
        else:
            local.copy_(reader.read_rows(key, start, stop))


def load_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights and optimizer state from `folder` into this run, whatever its world size and wrapping."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reader = ShardReader(folder)
    msd = _model_state(model)
    missing = [k for k in msd if f"model/{k}" not in reader.pieces]
    if missing:
        raise ConfigError(f"sharded checkpoint '{folder}' does not fit this model: missing {missing[:5]}")
    for fqn, t in msd.items():
        _fill(t, reader, f"model/{fqn}")
    set_model_state_dict(model, msd)
    osd = _optim_state(model, optimizer)
    for key, t in _flat_optim(osd):
        _fill(t, reader, key)
    set_optimizer_state_dict(model, optimizer, osd)


def export_from_shards(folder: Path, out_dir: Path, max_file_bytes: int = 1 << 30) -> None:
    """Write the model's weights as Hugging Face safetensors files (model.safetensors, or model-0000i-of-0000n with
    model.safetensors.index.json) from the shard files, one output file of at most `max_file_bytes` in memory."""
    reader = ShardReader(folder)
    keys = reader.keys("model/")
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        nbytes = math.prod(reader.shape(k)) * torch.empty((), dtype=_dtype(reader, k)).element_size()
        if groups[-1] and size + nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map, total = {}, 0
    for name, group in zip(names, groups, strict=True):
        tensors = {k.removeprefix("model/"): reader.read_rows(k, None, None) for k in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dtype(reader: ShardReader, key: str) -> torch.dtype:
    return getattr(torch, reader.pieces[key][0]["dtype"])
