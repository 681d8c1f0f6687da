"""LoRA and QLoRA through peft: which modules get adapters (the layer map's attention and MLP projections) and
wrapping a model with them."""

from __future__ import annotations

import warnings

from torch import nn

from fulltune.config import Config
from fulltune.errors import ConfigError
from fulltune.model.layermap import LayerMap, layer_map

LORA_METHODS = ("lora", "qlora")
"""Methods that train LoRA adapters over a frozen base (qlora: a 4-bit NF4 base)."""


def lora_targets(model: nn.Module, lmap: LayerMap | None = None) -> list[str]:
    """Default LoRA targets: the leaf names of every linear layer inside the blocks.

    Per family that is the attention and MLP projections (CLIP/ViT: q/k/v/out|o_proj, fc1, fc2; BERT: query, key,
    value, dense; Llama: q/k/v/o_proj, gate/up/down_proj). Reading them off the model keeps working when
    transformers renames modules (ViT's query/key/value became q_proj/k_proj/v_proj in v5).
    """
    lmap = lmap or layer_map(model)
    prefixes = lmap.block_prefixes
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(name.startswith(p + ".") for p in prefixes)
        }
    )
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"no linear layers found inside the blocks of this {getattr(model.config, 'model_type', '?')} model; "
            f"set method.lora.target_modules (linear layers in this model: {', '.join(linear) or 'none'})"
        )
    return targets


def wrap_lora(model: nn.Module, cfg: Config, task: str) -> nn.Module:
    """Wrap with peft LoRA adapters; a classification head trains fully (modules_to_save), an LM head stays."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.method.lora
    lmap = layer_map(model)
    if cfg.method.name == "qlora":  # 4-bit base: norms/embeddings to fp32, input grads for checkpointing
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    # Head modules by their top-level name ('classifier', 'score'; DistilBERT also 'pre_classifier').
    heads = sorted({n.split(".", 1)[0] for n in lmap.head}) if task != "causal_lm" else []
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules or lora_targets(model, lmap),
        modules_to_save=heads or None,
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing: not the user's
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, peft_cfg)
    except ValueError as err:  # peft checks its config here: "Target modules {...} not found in the base model"
        raise ConfigError(f"method.lora.target_modules={peft_cfg.target_modules}: {str(err).splitlines()[0]}") from None
