"""What a resume checks against the checkpoint it continues: that the model fits it (family, task, labels; before any
weight is read), that the data is the data it was trained on, and which settings changed since (said in the log,
never silent)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from fulltune.config import Config, dotted_items, to_dict
from fulltune.config.yamlfile import read_yaml
from fulltune.data.text import run_inputs
from fulltune.errors import ConfigError
from fulltune.files.safestate import file_digest


def data_fingerprint(cfg: Config) -> dict[str, str]:
    """What a run trains and evaluates on, one entry per split file or folder (a file's SHA-256; a folder's list of
    files with their sizes, so an image moved to another class folder shows; a `datasets` source by its name).
    A relabelled row or a moved image changes it; a copy of the same data elsewhere does not."""
    found: dict[str, str] = {}
    for item in run_inputs(cfg)[:-1]:  # the last is the model, checked by `check_fits`
        path = Path(item)
        if path.is_file():
            found[path.name] = file_digest(path)
        elif path.is_dir():
            listing = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                listing.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
            found[path.name + "/"] = listing.hexdigest()
        else:
            found[str(item)] = "source"
    return found


def check_data(point: Path, saved: dict[str, str] | None, now: dict[str, str]) -> None:
    """Refuse to continue a checkpoint on data (fingerprint `now`) other than it was trained on (`saved`): a resumed
    run must end as the uninterrupted one would. Checkpoints that predate the record are not checked."""
    if not saved:
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(
            f"checkpoint '{point}' was trained on other data: {', '.join(changed)} changed since; a resume needs "
            "the data it was trained on (for new data, start a run in a new --output_dir)"
        )


def check_resume(point: Path, saved: dict[str, str] | None, now: dict[str, str], cfg: Config) -> list[str]:
    """On a resume: refuse other data (`check_data`); return the settings that changed (`changed_settings`)."""
    check_data(point, saved, now)
    return changed_settings(point, cfg)


def changed_settings(point: Path, cfg: Config) -> list[str]:
    """`key: old -> new` for each setting that differs from the checkpoint's config.yaml (a changed learning rate,
    batch size, schedule...): allowed, and said."""
    path = Path(point) / "config.yaml"
    try:
        tree = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(tree, dict):
        return []
    saved, now = dict(dotted_items(tree)), dict(dotted_items(to_dict(cfg)))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if k in saved and saved[k] != now[k]]


def check_fits(path: Path, hf: nn.Module, saved: dict[str, Any]) -> None:
    """A resume point written for another task (architecture), model family, label set or model size is refused
    before any weight is read: filling the weights that do not fit with random ones would pass for a resume. `hf`:
    the transformers model trained (under LoRA, its base); `saved`: the checkpoint's config.json."""
    config = hf.config
    classes = [c.__name__ for c in type(hf).__mro__]  # FSDP's and LoRA's wrappers subclass the model's class
    ours, arch = {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}, saved.get("architectures")
    family = saved.get("model_type")
    sizes = _size_differences(saved, config.to_dict())
    for what, theirs, mine, same in (
        ("a different model family", family, config.model_type, family == config.model_type),
        ("a different task", arch, classes[0], not arch or arch[0] in classes),
        ("different labels", saved.get("id2label"), ours, saved.get("id2label") in (None, ours)),
        ("a model of another size", _sizes(sizes, 0), _sizes(sizes, 1), not sizes),
    ):
        if not same:
            raise ConfigError(f"checkpoint '{path}' was written for {what} ({theirs}; this run: {mine})")


SIZE_KEYS = frozenset(
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "max_position_embeddings type_vocab_size n_embd n_layer n_head n_positions n_inner image_size patch_size "
    "num_channels projection_dim".split()
)
"""The config.json keys that set tensor shapes: a checkpoint whose values differ holds weights of another size."""


def _size_differences(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, this run's value) for each size key that differs; sub-configs (CLIP's towers)
    are compared key by key."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    out = []
    for key in sorted(set(saved) & set(now)):
        a, b = saved[key], now[key]
        if isinstance(a, dict):
            out += _size_differences(a, b, f"{prefix}{key}.")
        elif key in SIZE_KEYS and a is not None and b is not None and a != b:
            out.append((prefix + key, a, b))
    return out


def _sizes(differences: list[tuple[str, Any, Any]], which: int) -> str:
    """'hidden_size 32, intermediate_size 64' from the saved (0) or this run's (1) side of the differences."""
    return ", ".join(f"{key} {values[which]}" for key, *values in differences)
