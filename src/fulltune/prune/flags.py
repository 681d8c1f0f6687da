"""The recovery guide's `--finetune_*` flags of `fulltune prune` and the config keys they set (shared by the command
line, which declares them, and the pipeline, which applies them)."""

from __future__ import annotations

from typing import Any

# --finetune_* flag -> (config key, default of the recovery guide's script). The defaults apply only without --config: a
# config file replaces them, and a flag typed on the command line (or a key=value override) wins over both.
FINETUNE_FLAGS: dict[str, tuple[str, Any]] = {
    "finetune_method": ("method.name", "full"),
    "finetune_lr": ("training.base_learning_rate", 1e-5),
    "finetune_epochs": ("training.num_epochs", 1),
    "finetune_samples": ("data.max_samples", 500),
    "finetune_batch_size": ("data.batch_size", 1),
    "finetune_seq_len": ("data.seq_len", 512),
    "finetune_grad_accum": ("training.gradient_accumulation_steps", 4),
    "finetune_max_grad_norm": ("training.max_grad_norm", 1.0),
    "finetune_weight_decay": ("training.weight_decay", 0.01),
    "finetune_warmup_steps": ("training.warmup_steps", 0),
}
# The guide's script's schedule: linear warmup, then linear decay.
SCRIPT_DEFAULTS: dict[str, Any] = {"training.lr_scheduler": "linear"}
