"""Foreign config names: the keys fulltune reads besides its own, each said once, and what they become.

- HF_TRAINER: Hugging Face Trainer's flat argument names (`learning_rate`, `eval_steps`), also read inside the
  fulltune sections HF_TRAINER_IN_SECTIONS lists (`training.learning_rate`, `data.max_train_samples`);
- SPELLINGS: other training configs' names for a key of fulltune's sections (`training.lr`, `model.name`, `lora.r`);
- CLIP_LAYOUT: the layout of a CLIP fine-tuning config.yaml, whose sections and keys sit at the top level or under
  other names (`layerwise_lr:` at the top level is `training.layerwise_lr`);
- EARLIER_KEYS, EARLIER_VALUES: fulltune's own earlier keys and values for the speed choices' switches
  (`hardware.cpu_dropout: torch` is `speed.cpu_dropout: off`).
`translate` applies them to one key and its value; `apply_implied_settings` adds what a config means beyond its
keys' names (a patience alone turns early stopping on).
"""

from __future__ import annotations

import sys
from typing import Any

from fulltune.errors import ConfigError

HF_TRAINER: dict[str, str] = {
    # TrainingArguments
    "learning_rate": "training.base_learning_rate",
    "num_train_epochs": "training.num_epochs",
    "max_steps": "training.max_steps",
    "per_device_train_batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "weight_decay": "training.weight_decay",
    "adam_epsilon": "training.adam_epsilon",
    "max_grad_norm": "training.max_grad_norm",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps",
    "label_smoothing_factor": "training.label_smoothing",
    "metric_for_best_model": "training.metric",
    "eval_steps": "training.eval_every_steps",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "logging_steps": "logging.log_every_steps",
    "save_steps": "checkpoint.save_every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "fp16": "hardware.mixed_precision",
    "bf16": "hardware.mixed_precision",
    "optim": "training.fused_optimizer",
    "seed": "training.seed",
    "dataloader_num_workers": "data.num_workers",
    # EarlyStoppingCallback
    "early_stopping_patience": "training.early_stopping.patience",
    # the run_* example scripts' data and model arguments
    "max_train_samples": "data.max_samples",
    "max_eval_samples": "data.max_eval_samples",
    "max_seq_length": "data.max_length",
    "train_file": "data.train_file",
    "validation_file": "data.val_file",
    "test_file": "data.test_file",
    "model_name_or_path": "model.name_or_path",
    "label_column_name": "data.label_column",
    "text_column_name": "data.text_column",
    "text_column": "data.text_column",
    "label_column": "data.label_column",
    "dataset_name": "data.dataset_name",
    "dataset_config_name": "data.dataset_config",
    "adam_beta1": "training.adam_beta1",
    "adam_beta2": "training.adam_beta2",
    "torch_compile": "training.compile",
    "report_to": "logging.report_to",
    "run_name": "logging.run_name",
    "logging_dir": "logging.log_dir",
}
"""Hugging Face Trainer's flat names -> fulltune's keys. `fp16`/`bf16: true` become mixed_precision fp16/bf16 (false:
no); `optim` takes the AdamW names of OPTIM_VALUES; `report_to` takes none, one tracker or a list."""

PRECISION_SWITCHES = ("fp16", "bf16")
"""HF Trainer's switches that set hardware.mixed_precision (true: that precision); on the command line a bare
`--bf16` means true."""

HF_TRAINER_ELSEWHERE: dict[str, str] = {
    "eval_strategy": "fulltune evaluates after every epoch; to evaluate every N optimizer steps too, set "
    "training.eval_every_steps=N (eval_steps)",
    "evaluation_strategy": "fulltune evaluates after every epoch; to evaluate every N optimizer steps too, set "
    "training.eval_every_steps=N (eval_steps)",
    "save_strategy": "set checkpoint.save_every_epochs=N and/or checkpoint.save_every_steps=N (save_steps)",
    "logging_strategy": "set logging.log_every_steps=N (logging_steps)",
    "load_best_model_at_end": "fulltune keeps the best checkpoint in best/ (checkpoint.save_best) by training.metric",
    "greater_is_better": "training.metric (metric_for_best_model) knows its direction",
    "overwrite_output_dir": "pass --overwrite to `fulltune train`",
    "do_train": "`fulltune train` trains; leave it out",
    "do_eval": "`fulltune train` evaluates on the validation split; leave it out",
    "do_predict": "use `fulltune evaluate` or `fulltune predict` on the run's best/",
    "push_to_hub": "use `fulltune export RUN --output_dir DIR --push_to_hub REPO`",
    "use_cpu": "set hardware.device=cpu",
    "no_cuda": "set hardware.device=cpu",
    "auto_find_batch_size": "`fulltune plan` recommends data.batch_size and training.gradient_accumulation_steps",
    "cache_dir": "set the HF_HOME environment variable",
}
"""Hugging Face Trainer names that have no one key in fulltune, and what to use instead (the error says it)."""

HF_TRAINER_IN_SECTIONS: dict[str, tuple[str, ...]] = {
    "training": (
        "learning_rate",
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "lr_scheduler_type",
        "label_smoothing_factor",
        "metric_for_best_model",
        "eval_steps",
        "early_stopping_patience",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "fp16",
        "bf16",
        "optim",
    ),
    "data": ("max_train_samples", "max_seq_length", "validation_file"),
    "model": ("gradient_checkpointing",),
    "hardware": ("fp16", "gradient_checkpointing"),
    "logging": ("logging_steps",),
}
"""Sections of fulltune's in which an HF_TRAINER name is read too (`training.learning_rate`), as the same key."""

SPELLINGS: dict[str, str] = {
    "training.lr": "training.base_learning_rate",
    "training.epochs": "training.num_epochs",
    "training.batch_size": "data.batch_size",
    "training.grad_accum": "training.gradient_accumulation_steps",
    "training.accumulation_steps": "training.gradient_accumulation_steps",
    "training.gradient_clip": "training.max_grad_norm",
    "training.clip_grad_norm": "training.max_grad_norm",
    "training.scheduler": "training.lr_scheduler",
    "training.patience": "training.early_stopping.patience",
    "training.save_every": "checkpoint.save_every_epochs",
    "training.mixed_precision": "hardware.mixed_precision",
    "training.log_interval": "logging.log_every_steps",
    "training.layer_decay": "training.layerwise_lr.decay_rate",
    "training.layerwise_lr.decay": "training.layerwise_lr.decay_rate",
    "training.layerwise_lr.lr_decay": "training.layerwise_lr.decay_rate",
    "data.train_dir": "data.data_dir",
    "data.dataset_dir": "data.data_dir",
    "data.block_size": "data.seq_len",
    "data.input_size": "data.image_size",
    "model.name": "model.name_or_path",
    "model.model_name": "model.name_or_path",
    "model.pretrained": "model.name_or_path",
    "model.pretrained_model": "model.name_or_path",
    "model.base_model": "model.name_or_path",
    "model.num_classes": "data.num_classes",
    "model.num_labels": "data.num_classes",
    "hardware.amp": "hardware.mixed_precision",
    "hardware.num_workers": "data.num_workers",
    "logging.log_interval": "logging.log_every_steps",
    "logging.tensorboard_dir": "logging.log_dir",
    "output.output_dir": "output_dir",
    "method.type": "method.name",
    "method.lora.lora_alpha": "method.lora.alpha",
    "method.lora.lora_dropout": "method.lora.dropout",
    "lora.r": "method.lora.r",
    "lora.alpha": "method.lora.alpha",
    "lora.lora_alpha": "method.lora.alpha",
    "lora.dropout": "method.lora.dropout",
    "lora.lora_dropout": "method.lora.dropout",
    "lora.target_modules": "method.lora.target_modules",
}
"""Other training configs' names for keys of fulltune's sections (PEFT's lora_alpha, timm's layer_decay, ...)."""

EARLIER_KEYS: dict[str, str] = {
    "hardware.cpu_dropout": "speed.cpu_dropout",
    "hardware.fused_qkv": "speed.fused_qkv",
    "hardware.cpu_allocator": "speed.cpu_allocator",
    "training.first_token_only": "speed.first_token_only",
}
"""fulltune's earlier keys for the speed choices' switches, now keys of the `speed` section (`auto | off`)."""

_SWITCH_WORDS = {False: "off", True: "auto"}
EARLIER_VALUES: dict[str, dict[Any, Any]] = {
    "speed.cpu_dropout": {"torch": "off", **_SWITCH_WORDS},
    "speed.fused_qkv": _SWITCH_WORDS,
    "speed.cpu_allocator": {"system": "off", **_SWITCH_WORDS},
    "speed.first_token_only": _SWITCH_WORDS,
    "speed.own_memory": _SWITCH_WORDS,
    "speed.threads": _SWITCH_WORDS,
}
"""Other spellings of a key's values, per fulltune key: the speed switches' earlier `torch` and `system` are off; an
unquoted off / on, which YAML 1.1 reads as false / true, is off / auto."""

ALIASES: dict[str, str] = {
    **HF_TRAINER,
    **{f"{section}.{name}": HF_TRAINER[name] for section, names in HF_TRAINER_IN_SECTIONS.items() for name in names},
    **SPELLINGS,
    **EARLIER_KEYS,
}
"""Every one-key alias, dotted -> fulltune's key (what a config key typed as a command-line flag may also be)."""

CLIP_LAYOUT_NAME = "a CLIP fine-tuning config.yaml"
CLIP_LAYOUT: dict[str, str] = {
    "layerwise_lr": "training.layerwise_lr",
    "progressive_unfreezing": "training.progressive_unfreezing",
    "early_stopping": "training.early_stopping",
    "layer_groups_lr": "training.layer_groups_lr",
    "patience": "training.early_stopping.patience",
    "gradient_accumulation": "training.gradient_accumulation_steps",
    "training.gradient_accumulation": "training.gradient_accumulation_steps",
    "base_learning_rate": "training.base_learning_rate",
    "num_epochs": "training.num_epochs",
    "label_smoothing": "training.label_smoothing",
    "batch_size": "data.batch_size",
    "mixed_precision": "hardware.mixed_precision",
}
"""The layout of a CLIP fine-tuning config.yaml, as dotted prefixes: a key at or under one moves, with what is below
it, under fulltune's key (`layerwise_lr.enabled` -> `training.layerwise_lr.enabled`), said once per process on
stderr. Its `learning_rate`, `weight_decay`, `warmup_ratio`, `max_grad_norm` and `gradient_accumulation_steps` at the
top level are Hugging Face Trainer's names (HF_TRAINER); its `mixed_precision: true` is amp (coercion.coerce)."""

OPTIM_VALUES = {"adamw_torch_fused": True, "adamw_torch": False, "adamw_hf": False}
"""HF Trainer's `optim` values that name an AdamW fulltune has -> training.fused_optimizer (fulltune trains with
AdamW only)."""

_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A line on stderr, once per process (a config is loaded again on resume, by evaluate, ...)."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def _layout_source(dotted: str) -> str | None:
    """The CLIP_LAYOUT prefix `dotted` is at or under, or None."""
    parts = dotted.split(".")
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if prefix in CLIP_LAYOUT:
            return prefix
    return None


def layout_key(dotted: str) -> str:
    """`layerwise_lr.enabled` -> `training.layerwise_lr.enabled`; a key outside CLIP_LAYOUT unchanged."""
    source = _layout_source(dotted)
    return dotted if source is None else CLIP_LAYOUT[source] + dotted[len(source) :]


def _optim_value(value: Any) -> bool:
    if not isinstance(value, str) or value not in OPTIM_VALUES:
        raise ConfigError(
            f"optim '{value}': fulltune trains with AdamW; expected one of {', '.join(OPTIM_VALUES)} "
            "(8-bit AdamW: training.memory=lean training.lean_optimizer=adamw8bit)"
        )
    return OPTIM_VALUES[value]


def _earlier_value(key: str, value: Any) -> Any:
    """`value` as fulltune's `key` spells it (EARLIER_VALUES: speed.cpu_dropout torch -> off)."""
    try:
        return EARLIER_VALUES.get(key, {}).get(value, value)
    except TypeError:  # an unhashable value (a list, a mapping) is no spelling: the type check names it
        return value


def _report_to_value(value: Any) -> Any:
    """HF Trainer's `report_to`: none -> [], one name (or `a,b`) -> a list."""
    if value is None or value == "none":
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def translate(dotted: str, value: Any, say_layout: bool = True) -> tuple[str, Any]:
    """A key as written and its value -> fulltune's key and value: moved by CLIP_LAYOUT (said once), then renamed
    by ALIASES; `fp16: true` becomes mixed_precision fp16, `optim: adamw_torch` fused_optimizer false,
    `hardware.cpu_dropout: torch` speed.cpu_dropout off (EARLIER_VALUES). A Hugging Face Trainer name without a
    fulltune key (HF_TRAINER_ELSEWHERE) is an error that says what to use. `say_layout`: say that a config file is
    read as CLIP_LAYOUT (a key typed on the command line, `num_epochs=2`, is only a short name: nothing said)."""
    if dotted in HF_TRAINER_ELSEWHERE:
        raise ConfigError(
            f"'{dotted}' (a Hugging Face Trainer argument) has no fulltune key: {HF_TRAINER_ELSEWHERE[dotted]}"
        )
    source = _layout_source(dotted)
    if source is not None and say_layout:
        _say_once(f"read as the layout of {CLIP_LAYOUT_NAME}: {source} -> {CLIP_LAYOUT[source]}")
    dotted = layout_key(dotted)
    key = ALIASES.get(dotted, dotted)
    leaf = dotted.rsplit(".", 1)[-1]
    if key == "hardware.mixed_precision" and leaf in PRECISION_SWITCHES and isinstance(value, bool):
        value = leaf if value else "no"
    if leaf == "optim":
        value = _optim_value(value)
    if leaf == "report_to" and key == "logging.report_to":
        value = _report_to_value(value)
    return key, _earlier_value(key, value)


def apply_implied_settings(tree: dict[str, Any]) -> None:
    """What a config means beyond its keys' names, applied to the tree of fulltune's keys: a patience without
    `enabled` turns early stopping on; progressive unfreezing enabled without a schedule runs the automatic one
    (methods.plan_trainable), said here."""
    training = tree.get("training")
    if not isinstance(training, dict):
        return
    es = training.get("early_stopping")
    if isinstance(es, dict) and "patience" in es and "enabled" not in es:
        es["enabled"] = True
        _say_once(f"patience: {es['patience']} turns early stopping on (training.early_stopping.enabled=true)")
    pu = training.get("progressive_unfreezing")
    if isinstance(pu, dict) and pu.get("enabled") is True and not pu.get("unfreeze_schedule") and not pu.get("auto"):
        _say_once(
            "progressive_unfreezing {enabled: true} without a schedule uses the automatic one "
            "(training.progressive_unfreezing.auto=1: the head first, one more block from the top each epoch)"
        )
