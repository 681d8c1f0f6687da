"""Loading a config: YAML and dotted `key=value` overrides, aliases (HF Trainer's flat names such as
`learning_rate`, `eval_steps`, `max_train_samples`) and the seed documents' layouts mapped onto fulltune's keys,
types checked and coerced (unknown keys and wrong types are errors naming the key and the valid choices), then the
checks of `config.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fulltune.config.checks import validate
from fulltune.config.sections import (
    Config,
)
from fulltune.config.yamlfile import read_yaml
from fulltune.errors import ConfigError

# Spellings from the seed documents and from Hugging Face's TrainingArguments, mapped to fulltune's keys
# (both as full dotted paths). An alias is rewritten on load; the canonical key is what is saved.
ALIASES: dict[str, str] = {
    "training.learning_rate": "training.base_learning_rate",
    "training.lr": "training.base_learning_rate",
    "training.epochs": "training.num_epochs",
    "training.num_train_epochs": "training.num_epochs",
    "training.batch_size": "data.batch_size",
    "training.per_device_train_batch_size": "data.batch_size",
    "training.grad_accum": "training.gradient_accumulation_steps",
    "training.accumulation_steps": "training.gradient_accumulation_steps",
    "training.gradient_clip": "training.max_grad_norm",
    "training.clip_grad_norm": "training.max_grad_norm",
    "training.scheduler": "training.lr_scheduler",
    "training.lr_scheduler_type": "training.lr_scheduler",
    "training.patience": "training.early_stopping.patience",
    "training.early_stopping_patience": "training.early_stopping.patience",
    "training.save_every": "checkpoint.save_every_epochs",
    "training.save_steps": "checkpoint.save_every_steps",
    "training.save_total_limit": "checkpoint.keep_last",
    "training.fp16": "hardware.mixed_precision",
    "training.bf16": "hardware.mixed_precision",
    "training.mixed_precision": "hardware.mixed_precision",
    "training.logging_steps": "logging.log_every_steps",
    "training.log_interval": "logging.log_every_steps",
    "training.layer_decay": "training.layerwise_lr.decay_rate",
    "training.layerwise_lr.decay": "training.layerwise_lr.decay_rate",
    "training.layerwise_lr.lr_decay": "training.layerwise_lr.decay_rate",
    "training.seed": "training.seed",
    "seed": "training.seed",
    "data.train_dir": "data.data_dir",
    "data.dataset_dir": "data.data_dir",
    "data.eval_batch_size": "data.eval_batch_size",
    "data.max_seq_length": "data.max_length",
    "data.block_size": "data.seq_len",
    "data.input_size": "data.image_size",
    "model.name": "model.name_or_path",
    "model.model_name": "model.name_or_path",
    "model.pretrained": "model.name_or_path",
    "model.pretrained_model": "model.name_or_path",
    "model.base_model": "model.name_or_path",
    "model.num_classes": "data.num_classes",
    "model.num_labels": "data.num_classes",
    "model.gradient_checkpointing": "training.gradient_checkpointing",
    "hardware.fp16": "hardware.mixed_precision",
    "hardware.amp": "hardware.mixed_precision",
    "hardware.num_workers": "data.num_workers",
    "hardware.gradient_checkpointing": "training.gradient_checkpointing",
    "logging.log_interval": "logging.log_every_steps",
    "logging.logging_steps": "logging.log_every_steps",
    "logging.tensorboard_dir": "logging.log_dir",
    "output.output_dir": "output_dir",
    "method.type": "method.name",
    "lora.r": "method.lora.r",
    "lora.alpha": "method.lora.alpha",
    "lora.lora_alpha": "method.lora.alpha",
    "lora.dropout": "method.lora.dropout",
    "lora.lora_dropout": "method.lora.dropout",
    "lora.target_modules": "method.lora.target_modules",
    "method.lora.lora_alpha": "method.lora.alpha",
    "method.lora.lora_dropout": "method.lora.dropout",
    # Hugging Face Trainer's flat argument names (TrainingArguments and the run_* example scripts).
    "learning_rate": "training.base_learning_rate",
    "num_train_epochs": "training.num_epochs",
    "max_steps": "training.max_steps",
    "per_device_train_batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "training.per_device_eval_batch_size": "data.eval_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "weight_decay": "training.weight_decay",
    "adam_epsilon": "training.adam_epsilon",
    "max_grad_norm": "training.max_grad_norm",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps",
    "label_smoothing_factor": "training.label_smoothing",
    "training.label_smoothing_factor": "training.label_smoothing",
    "metric_for_best_model": "training.metric",
    "training.metric_for_best_model": "training.metric",
    "eval_steps": "training.eval_every_steps",
    "training.eval_steps": "training.eval_every_steps",
    "early_stopping_patience": "training.early_stopping.patience",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "logging_steps": "logging.log_every_steps",
    "save_steps": "checkpoint.save_every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "fp16": "hardware.mixed_precision",
    "bf16": "hardware.mixed_precision",
    "max_train_samples": "data.max_samples",
    "data.max_train_samples": "data.max_samples",
    "max_eval_samples": "data.max_eval_samples",
    "max_seq_length": "data.max_length",
    "dataloader_num_workers": "data.num_workers",
    "train_file": "data.train_file",
    "validation_file": "data.val_file",
    "data.validation_file": "data.val_file",
    "test_file": "data.test_file",
    "model_name_or_path": "model.name_or_path",
    "label_column_name": "data.label_column",
    "text_column_name": "data.text_column",
    "optim": "training.fused_optimizer",
    "training.optim": "training.fused_optimizer",
}
# HF Trainer's `optim` values that mean an AdamW fulltune has (fulltune trains with AdamW only).
OPTIM_VALUES = {"adamw_torch_fused": True, "adamw_torch": False, "adamw_hf": False}


def _optim_value(value: Any) -> bool:
    if value not in OPTIM_VALUES:
        raise ConfigError(
            f"optim '{value}': fulltune trains with AdamW; expected one of {', '.join(OPTIM_VALUES)} "
            "(8-bit AdamW: training.memory=lean training.lean_optimizer=adamw8bit)"
        )
    return OPTIM_VALUES[value]


# Seed layouts (issue 13): sections and keys the seed documents write at the top level or under other names, as
# dotted prefixes. A key at or under a prefix moves under the target; each mapping is logged once per process.
# (Kept apart from ALIASES, which holds one-key spellings, Hugging Face's among them.)
SEED_LAYOUTS: dict[str, str] = {
    "layerwise_lr": "training.layerwise_lr",
    "progressive_unfreezing": "training.progressive_unfreezing",
    "early_stopping": "training.early_stopping",
    "patience": "training.early_stopping.patience",
    "gradient_accumulation": "training.gradient_accumulation_steps",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "training.gradient_accumulation": "training.gradient_accumulation_steps",
    "mixed_precision": "hardware.mixed_precision",
    "learning_rate": "training.base_learning_rate",
    "base_learning_rate": "training.base_learning_rate",
    "num_epochs": "training.num_epochs",
    "batch_size": "data.batch_size",
    "weight_decay": "training.weight_decay",
    "warmup_ratio": "training.warmup_ratio",
    "max_grad_norm": "training.max_grad_norm",
    "label_smoothing": "training.label_smoothing",
    "layer_groups_lr": "training.layer_groups_lr",
}
_LOGGED_LAYOUTS: set[str] = set()


def _log_layout(message: str) -> None:
    if message not in _LOGGED_LAYOUTS:
        _LOGGED_LAYOUTS.add(message)
        print(f"seed layout: {message}", file=sys.stderr, flush=True)


def _seed_layout(dotted: str) -> str:
    """`layerwise_lr.enabled` -> `training.layerwise_lr.enabled` (logged), other keys unchanged."""
    for source, target in SEED_LAYOUTS.items():
        if dotted == source or dotted.startswith(source + "."):
            _log_layout(f"{source} -> {target}")
            return target + dotted[len(source) :]
    return dotted


def _seed_semantics(tree: dict[str, Any]) -> None:
    """What the seeds mean beyond key names: a patience alone turns early stopping on; progressive unfreezing
    enabled alone runs the automatic schedule (methods.plan_trainable), said here."""
    training = tree.get("training")
    if not isinstance(training, dict):
        return
    es = training.get("early_stopping")
    if isinstance(es, dict) and "patience" in es and "enabled" not in es:
        es["enabled"] = True
        _log_layout(f"patience: {es['patience']} turns early stopping on (training.early_stopping.enabled=true)")
    pu = training.get("progressive_unfreezing")
    if isinstance(pu, dict) and pu.get("enabled") is True and not pu.get("unfreeze_schedule") and not pu.get("auto"):
        _log_layout(
            "progressive_unfreezing {enabled: true} without a schedule uses the automatic one "
            "(training.progressive_unfreezing.auto=1: the head first, one more block from the top each epoch)"
        )


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-5 is a str in YAML 1.1)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        # Seed documents write `mixed_precision: true/false` (true: their torch.cuda.amp fp16 + GradScaler).
        if isinstance(value, bool) and "auto" in args and "no" in args:
            return ("amp" if "amp" in args else "auto") if value else "no"
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str) and args and args[0] is str:
                value = [v for v in value.split(",") if v]
            else:
                raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int, float or str from YAML's loose scalars ('1e-5', 'true', 3.0 for an int)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    """An int (4, 4.0, '4') or a float (1, 1e-5, '1e-5'); booleans are neither."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"config key '{key}': expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{full}'{hint}; valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not _is_leaf_mapping(full):
            items.extend(_flatten(value, full))
        else:
            items.append((full, value))
    return items


def _is_leaf_mapping(dotted: str) -> bool:
    """Keys whose value is itself a free-form mapping (not a section)."""
    return dotted in (
        "model.tiny_config",
        "data.class_names",
        "data.data_files",
        "training.layer_groups_lr",
        "layer_groups_lr",
    )


def _canonical_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite aliases into canonical dotted keys; the precision aliases fp16/bf16 become mixed_precision values."""
    tree: dict[str, Any] = {}
    for dotted, value in _flatten(raw):
        dotted = _seed_layout(dotted)
        target = ALIASES.get(dotted, dotted)
        leaf = dotted.rsplit(".", 1)[-1]
        if target == "hardware.mixed_precision" and leaf in ("fp16", "bf16") and isinstance(value, bool):
            value = leaf if value else "no"
        if leaf == "optim":
            value = _optim_value(value)
        _set_dotted(tree, target, value)
    _seed_semantics(tree)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """`training.base_learning_rate=1e-5` -> ('training.base_learning_rate', 1e-5), values parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. training.base_learning_rate=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = read_yaml(raw, f"override '{key}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = read_yaml(p.read_text(encoding="utf-8"), f"config file '{p}'")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file '{p}': not UTF-8 text (byte {err.start}); is it a YAML file?") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{p}'{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': expected a mapping of sections at the top level")
        raw = loaded
    tree = _canonical_tree(raw)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        key = _seed_layout(key)
        target = ALIASES.get(key, key)
        if (
            target == "hardware.mixed_precision"
            and key.rsplit(".", 1)[-1] in ("fp16", "bf16")
            and isinstance(value, bool)
        ):
            value = key.rsplit(".", 1)[-1] if value else "no"
        if key.rsplit(".", 1)[-1] == "optim":
            value = _optim_value(value)
        _set_dotted(tree, target, value)
    _seed_semantics(tree)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in checkpoints)."""
    cfg = _build(Config, _canonical_tree(values))
    validate(cfg)
    return cfg
