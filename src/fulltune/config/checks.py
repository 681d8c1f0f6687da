"""Checks that types alone cannot express: cross-field rules and every numeric value in its range, at load, before
any folder is created; each error names the key, the value and what is allowed."""

from __future__ import annotations

import codecs
import math
import os
import re
from typing import Any

from fulltune.config.coercion import coerce
from fulltune.config.sections import Config
from fulltune.errors import ConfigError


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t, d = cfg.training, cfg.data
    checks = [
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps must be >= 1"),
        (t.num_epochs >= 1 or (t.max_steps or 0) >= 1, "training.num_epochs must be >= 1"),
        (0 < t.base_learning_rate < math.inf, "training.base_learning_rate must be a finite number > 0"),
        (0 <= t.warmup_ratio < 1, "training.warmup_ratio must be in [0, 1)"),
        (0 <= t.label_smoothing < 1, "training.label_smoothing must be in [0, 1)"),
        (0 < t.layerwise_lr.decay_rate <= 1, "training.layerwise_lr.decay_rate must be in (0, 1]"),
        (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm must be > 0 or null"),
        (cfg.method.trainable_layers >= 0, "method.trainable_layers must be >= 0"),
        (d.max_length >= 2 and d.seq_len >= 2, "data.max_length and data.seq_len must be >= 2"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (not d.streaming or d.dataset_name, "data.streaming=true streams data.dataset_name; give data.dataset_name"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_ranges(cfg)
    if isinstance(cfg.model.tiny_config, dict):
        _check_tiny_sizes(cfg.model.tiny_config, "model.tiny_config")
    _validate_head_init(cfg)
    pu = t.progressive_unfreezing
    if isinstance(pu.auto, int) and pu.auto < 1:
        raise ConfigError(f"training.progressive_unfreezing.auto must be >= 1 or 'proportional', got {pu.auto}")
    if t.layer_groups_lr is not None:
        for name, lr in list(t.layer_groups_lr.items()):
            t.layer_groups_lr[name] = coerce(lr, float, f"training.layer_groups_lr.{name}")
            if not 0 < t.layer_groups_lr[name] < math.inf:  # NaN fails too
                raise ConfigError(f"training.layer_groups_lr.{name} must be a finite number > 0, got {lr}")


METRICS = {
    "text_classification": ("accuracy", "top5_accuracy", "macro_f1", "loss"),
    "image_classification": ("accuracy", "top5_accuracy", "macro_f1", "loss"),
    "text_regression": ("mse", "mae", "pearson", "spearman", "loss"),
    "multi_label_classification": ("micro_f1", "macro_f1", "loss"),
    "token_classification": ("f1", "precision", "recall", "accuracy", "loss"),
    "causal_lm": ("loss", "perplexity"),
}
"""Validation metrics each task reports (what training.metric may name)."""

_ANY = object()


def _ranges(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    """(key, value, predicate, what is allowed) for every numeric key with a range; None values are defaults."""
    t, d, h, c, a = cfg.training, cfg.data, cfg.hardware, cfg.checkpoint, cfg.data.augmentation
    ge = lambda n: (lambda v: v >= n, f">= {n}")  # noqa: E731
    optional_ge = lambda n: (lambda v: v is None or v >= n, f">= {n} (or null)")  # noqa: E731
    unit = (lambda v: 0 <= v < 1, "in [0, 1)")
    return [
        ("logging.log_every_steps", cfg.logging.log_every_steps, *ge(1)),
        ("data.eval_batch_size", d.eval_batch_size, *optional_ge(1)),
        ("data.max_samples", d.max_samples, *optional_ge(1)),
        ("data.shuffle_buffer", d.shuffle_buffer, *ge(0)),
        (
            "data.max_eval_samples",
            d.max_eval_samples,
            lambda v: v is None or v >= 1,
            ">= 1 (an empty validation set cannot pick best/; for no validation at all give no validation split and "
            "set data.val_fraction=0)",
        ),
        ("data.image_size", d.image_size, *optional_ge(1)),
        ("data.num_workers", d.num_workers, *ge(-1)),
        ("data.num_classes", d.num_classes, *optional_ge(2)),
        ("data.augmentation.color_jitter", a.color_jitter, *ge(0)),
        ("data.augmentation.rotation", a.rotation, lambda v: 0 <= v <= 180, "in [0, 180]"),
        (
            "data.augmentation.crop_scale",
            a.crop_scale,
            lambda v: 0 < v[0] <= v[1] <= 1,
            "two fractions 0 < a <= b <= 1",
        ),
        # More threads than 64 per core only slows a run down, and OpenMP crashes far beyond it.
        ("hardware.num_threads", h.num_threads, lambda v: v is None or 1 <= v <= 64 * _cores(), "1 to 64 x cores"),
        # numpy's and transformers' seeding take 32-bit seeds; torch's sampler seeds a generator with seed x 1e6.
        ("training.seed", t.seed, lambda v: 0 <= v < 2**32, f"0 to {2**32 - 1}"),
        ("training.adam_beta1", t.adam_beta1, *unit),
        ("training.adam_beta2", t.adam_beta2, *unit),
        ("training.adam_epsilon", t.adam_epsilon, lambda v: v > 0, "> 0"),
        ("training.max_steps", t.max_steps, *optional_ge(1)),
        ("training.num_epochs", t.num_epochs, *ge(0)),
        ("training.weight_decay", t.weight_decay, *ge(0)),
        ("training.warmup_steps", t.warmup_steps, *optional_ge(0)),
        ("training.min_lr_ratio", t.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("training.head_lr_mult", t.head_lr_mult, lambda v: v > 0, "> 0"),
        ("training.eval_every_steps", t.eval_every_steps, *optional_ge(1)),
        ("training.early_stopping.min_delta", t.early_stopping.min_delta, *ge(0)),
        ("training.early_stopping.patience", t.early_stopping.patience, *ge(1)),
        (
            "training.progressive_unfreezing.auto",
            t.progressive_unfreezing.auto,
            lambda v: v is None or v == "proportional" or v >= 1,
            ">= 1, 'proportional' (or null)",
        ),
        ("checkpoint.save_every_epochs", c.save_every_epochs, *ge(0)),
        ("checkpoint.save_every_steps", c.save_every_steps, *optional_ge(1)),
        ("checkpoint.keep_last", c.keep_last, *ge(0)),
        ("method.lora.r", cfg.method.lora.r, *ge(1)),
        ("method.lora.alpha", cfg.method.lora.alpha, lambda v: v > 0, "> 0"),
        ("method.lora.dropout", cfg.method.lora.dropout, *unit),
        ("eval.threshold", cfg.eval.threshold, lambda v: 0 < v < 1, "in (0, 1)"),
    ]


def check_ranges(cfg: Config) -> None:
    """Every numeric value in its range, the metric known to the task: one error naming key, value and range."""
    for key, value, ok, allowed in _ranges(cfg):
        bad_float = isinstance(value, float) and not math.isfinite(value)
        if bad_float or not ok(value):
            raise ConfigError(f"config key '{key}': {value!r} is out of range; allowed: {allowed}")
    check_text_encoding(cfg.data.encoding, "config key 'data.encoding'")
    metric = cfg.training.metric
    known = METRICS.get(cfg.task) or tuple(dict.fromkeys(m for ms in METRICS.values() for m in ms))
    if metric != "auto" and metric not in known:
        where = f"task {cfg.task}" if cfg.task in METRICS else "any task"
        raise ConfigError(
            f"config key 'training.metric': '{metric}' is not a metric of {where}; choose auto, " + ", ".join(known)
        )


def check_text_encoding(encoding: str, where: str) -> None:
    """`encoding` decodes bytes to text (utf-8, latin-1, cp1252): unknown names and the bytes-to-bytes codecs that
    `codecs` also knows (base64, rot13, zlib) are refused, naming `where`."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"{where}: unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    try:
        b"a".decode(encoding)
    except UnicodeDecodeError:
        pass  # a text encoding that needs more than one byte (utf-16)
    except (LookupError, UnicodeError):  # base64, rot13, zlib; `undefined` fails on any input
        raise ConfigError(
            f"{where}: {encoding!r} is not a text encoding (it maps bytes to bytes); use one such as utf-8, latin-1 "
            "or cp1252"
        ) from None


# Sizes and counts of a model config: whole numbers >= 1 wherever a tiny_config gives them.
_SIZE_KEY = re.compile(r"^(num_|n_)[a-z_]+$|_size$|_dim$|^max_position_embeddings$")


def _check_tiny_sizes(tiny: dict[str, Any], where: str) -> None:
    """Every size or count a tiny_config gives (hidden_size, num_attention_heads, n_embd, head_dim, ...) is a whole
    number >= 1, in the config and its sub-configs (vision_config, text_config)."""
    for key, value in tiny.items():
        if isinstance(value, dict):
            _check_tiny_sizes(value, f"{where}.{key}")
        elif _SIZE_KEY.search(key) and value is not None and not _whole_sizes(value):
            raise ConfigError(f"config key '{where}.{key}': {value!r} is out of range; allowed: a whole number >= 1")


def _whole_sizes(value: Any) -> bool:
    """A whole number >= 1, or a list of them (an image_size of [height, width])."""
    values = value if isinstance(value, list) and value else [value]
    return all(type(v) is int and v >= 1 for v in values)


def _validate_head_init(cfg: Config) -> None:
    m = cfg.method
    for i, template in enumerate(m.prompt_templates):
        if template.count("{}") != 1:
            raise ConfigError(
                f"method.prompt_templates[{i}] '{template}': needs exactly one {{}} where the class name goes"
            )
    if m.head_init != "random" and not m.prompt_templates:
        raise ConfigError(f"method.head_init={m.head_init}: method.prompt_templates is empty")
    if m.head_init == "linear_probe":
        if m.head_init_epochs < 1:
            raise ConfigError("method.head_init_epochs must be >= 1")
        if cfg.training.progressive_unfreezing.enabled:
            raise ConfigError(
                "method.head_init=linear_probe is itself an unfreeze schedule (head first, then the method); "
                "disable training.progressive_unfreezing or use head_init random"
            )
        if cfg.training.max_steps is None and m.head_init_epochs >= cfg.training.num_epochs:
            raise ConfigError(
                f"method.head_init_epochs={m.head_init_epochs} leaves no epoch of fine-tuning in "
                f"training.num_epochs={cfg.training.num_epochs}"
            )


def _cores() -> int:
    return os.cpu_count() or 1
