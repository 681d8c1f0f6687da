"""LoRA and QLoRA through peft: which modules get adapters (the layer map's attention and MLP projections) and
wrapping a model with them."""

from __future__ import annotations

import warnings

import torch
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


def is_quantized(model: nn.Module) -> bool:
    """True where some weight is stored quantized (bitsandbytes' 4-bit Params4bit carries a quant_state)."""
    return any(hasattr(p, "quant_state") for p in model.parameters())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that ``merge_and_unload()`` would give a copy of this peft model, built on the CPU one tensor at
    a time: an adapted weight is copied to the CPU and its LoRA delta (lora_B @ lora_A * scaling, computed where the
    adapter lives: one layer's worth) added there, so the device never holds a second copy of the model and the live
    model, adapters included, is left as it trains. Keys are the plain model's (`save_pretrained(state_dict=...)`)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    on_cpu: dict[int, torch.Tensor] = {}  # a tensor shared by two names (tied embeddings) stays shared

    def cpu(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in on_cpu:
            on_cpu[id(t)] = t.detach().cpu()
        return on_cpu[id(t)]

    replaced: list[str] = []  # prefixes whose tensors come from a LoRA layer's base or a trained head copy
    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(p) for p in replaced):
            continue
        if isinstance(module, LoraLayer):
            replaced.append(prefix)
            layer = module.get_base_layer()
            for key, t in layer.state_dict(keep_vars=True).items():
                state[prefix + key] = cpu(t)
            weight = state[prefix + "weight"].clone() if layer.weight.device.type == "cpu" else state[prefix + "weight"]
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    if adapter in getattr(module, "lora_variant", {}):
                        raise ConfigError(f"{name}: a LoRA variant (DoRA, ...) has no tensor-by-tensor merge here")
                    weight += module.get_delta_weight(adapter).cpu()  # promoted and rounded as peft's merge
            state[prefix + "weight"] = weight
        elif isinstance(module, ModulesToSaveWrapper):
            replaced.append(prefix)
            active = module.active_adapters
            trained = module.modules_to_save[module.active_adapter] if active else module.original_module
            for key, t in trained.state_dict(keep_vars=True).items():
                state[prefix + key] = cpu(t)
        else:
            skip = module._non_persistent_buffers_set
            own = [*module._parameters.items(), *((k, b) for k, b in module._buffers.items() if k not in skip)]
            for key, t in own:
                if t is not None:
                    state[prefix + key] = cpu(t)
    return state
