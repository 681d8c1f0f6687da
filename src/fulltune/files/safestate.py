"""Nested Python state (optimizer and scaler state dicts, RNG states, caches) stored without pickle: every tensor
goes into one safetensors file, the structure and the plain values into JSON beside it.

Loading parses JSON and safetensors only, so a file planted in a checkpoint can at worst be rejected, never run.
The round trip is exact: tensors keep dtype and bits, floats keep their repr (NaN/inf included), tuples stay tuples,
int dict keys stay ints, numpy arrays keep their dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fulltune.errors import ConfigError, StateFileError

FORMAT = "fulltune-state-1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # safetensors refuses shared or strided storage: store an owning contiguous copy on the CPU
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file (only tensors, arrays and JSON values)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise StateFileError(f"{where}: tensor '{key}' is missing from its .safetensors file")
        return tensors[key]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__dtype__" in obj:
        dtype = getattr(torch, str(obj["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise StateFileError(f"{where}: unknown dtype '{obj['__dtype__']}'")
        return dtype
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(obj: Any, folder: Path, name: str) -> list[Path]:
    """Write `obj` as `name.json` (+ `name.safetensors` when it holds tensors); return the files written."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    files = []
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
        files.append(folder / f"{name}.safetensors")
    doc = {"format": FORMAT, "tensors": f"{name}.safetensors" if tensors else None, "state": tree}
    (folder / f"{name}.json").write_text(json.dumps(doc), encoding="utf-8")
    files.append(folder / f"{name}.json")
    return files


def read_json(path: Path) -> Any:
    """A JSON file, or a StateFileError naming it (missing, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"'{path}' is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"'{path}' is damaged (not JSON: {err})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file on the CPU, or a StateFileError naming it (missing, truncated, bad header)."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"'{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StateFileError(
            f"'{path}' is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None


def check_tensors_header(path: Path) -> None:
    """Parse a safetensors header and check that the file holds every byte it declares (cheap: no tensor read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StateFileError(f"'{path}' is damaged (shorter than a safetensors header)")
            n = int.from_bytes(head, "little")
            size = path.stat().st_size
            if n > size - 8:
                raise StateFileError(f"'{path}' is damaged (header of {n} bytes in a file of {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StateFileError(f"'{path}' is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested too deep
        raise StateFileError(f"'{path}' is damaged (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise StateFileError(f"'{path}' is damaged (unreadable safetensors header)")
    end = max((_tensor_end(path, name, entry) for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise StateFileError(f"'{path}' is truncated ({size} bytes, its header declares {8 + n + end})")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise StateFileError(f"'{path}' is damaged ({err})") from None


def _tensor_end(path: Path, name: str, entry: Any) -> int:
    """Where a tensor's bytes end, from its header entry {"dtype", "shape", "data_offsets": [begin, end]}; an entry
    of any other shape (no offsets, offsets that are not whole numbers, an infinite one) is damage."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(v) is int for v in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise StateFileError(f"'{path}' is damaged (tensor {name[:80]!r} has no valid data_offsets in its header)")
    return offsets[1]


def load_state(folder: Path, name: str) -> Any:
    """Read what `save_state` wrote; any damage is a StateFileError naming the file."""
    folder = Path(folder)
    path = folder / f"{name}.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise StateFileError(f"'{path}' is not a fulltune state file (format {FORMAT})")
    tensors = load_tensors(folder / doc["tensors"]) if doc.get("tensors") else {}
    try:
        return _decode(doc["state"], tensors, str(path))
    except (TypeError, ValueError, KeyError) as err:
        if isinstance(err, StateFileError):
            raise
        raise StateFileError(f"'{path}' is damaged ({err})") from None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: str | Path, what: str = "model folder") -> None:
    """A local model folder must hold its weights as safetensors: one holding only pickled weights
    (pytorch_model.bin and the like, which can run code when loaded) is refused, naming the file. Hub ids and
    folders without weight files pass (transformers itself is then asked for safetensors only)."""
    path = Path(folder)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS and p.is_file())
    if pickled:
        raise ConfigError(
            f"{what} '{path}' holds its weights only as {pickled[0]}, a pickle that can run code when loaded; "
            "fulltune loads safetensors only: convert it where you trust it (save_pretrained(..., "
            "safe_serialization=True))"
        )
