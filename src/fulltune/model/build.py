"""Build a model and its preprocessor from a hub id, a local folder or an inline tiny config, and map parameters
to layers.

The layer map (parameter name -> layer index, per model family) is what layer-wise LR decay, partial fine-tuning
and progressive unfreezing are computed from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, ConfigError
from fulltune.files.safestate import require_safetensors
from fulltune.model.bundle import (
    ModelBundle,
    image_spec_for,
    load_tokenizer,
    make_image_processor,
    resolve_dtype,
    resolve_model_path,
    set_end_token,
)
from fulltune.model.clip import build_for_head_init
from fulltune.model.pruned import is_pruned_folder, load_pruned

_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
    "hidden_dropout",
)


def _apply_dropout(config: Any, p: float) -> None:
    """Override dropout probabilities in a config and its sub-configs (vision_config, text_config)."""
    for sub in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
        if sub is None:
            continue
        for key in _DROPOUT_KEYS:
            if key in sub.to_dict():
                setattr(sub, key, p)


def _label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    if not labels:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _load_config(cfg: Config, path: str | None) -> Any:
    from transformers import AutoConfig

    if cfg.model.tiny_config is not None:
        tiny = dict(cfg.model.tiny_config)
        model_type = tiny.pop("model_type", None)
        if not model_type:
            raise ConfigError("model.tiny_config needs a model_type (e.g. bert, clip, vit, llama)")
        return AutoConfig.for_model(model_type, **tiny)
    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}': cannot load a model config "
            f"(not a local model folder, and the hub is unreachable or has no such model: {str(err).splitlines()[0]})"
        ) from None


def _auto_class(task: str, config: Any) -> Any:
    import transformers as tf

    if task == "image_classification":
        if config.model_type in ("clip", "clip_vision_model"):
            return tf.CLIPForImageClassification
        return tf.AutoModelForImageClassification
    if task == "text_classification":
        return tf.AutoModelForSequenceClassification
    if task == "causal_lm":
        return tf.AutoModelForCausalLM
    raise ConfigError(f"task '{task}' has no model class")


def _clip_config_from_vision(config: Any) -> Any:
    """CLIPForImageClassification wants a full CLIPConfig; wrap a bare vision config in one."""
    from transformers import CLIPConfig

    if config.model_type == "clip_vision_model":
        return CLIPConfig(vision_config=config.to_dict())
    return config


def quantization_config(cfg: Config) -> Any:
    """method.name=qlora: a 4-bit NF4 base (double quantisation, bf16 compute) via bitsandbytes; CUDA only."""
    if cfg.method.name != "qlora":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(
            "method.name=qlora loads the base model in 4-bit NF4 with bitsandbytes, which needs CUDA; "
            "use method.name=lora (with model.torch_dtype=bfloat16 to halve the base) on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method.name=qlora needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def build_model(cfg: Config, task: str, labels: list[str] | None = None) -> ModelBundle:
    """The model for `task` with a fresh head for `labels`, plus its tokenizer or image spec."""
    path = None if cfg.model.tiny_config is not None else resolve_model_path(cfg.model.name_or_path)
    config = _load_config(cfg, path)
    if task == "image_classification" and config.model_type in ("clip", "clip_vision_model"):
        config = _clip_config_from_vision(config)
    for key, value in _label_kwargs(labels).items():
        setattr(config, key, value)
    if cfg.model.dropout is not None:
        _apply_dropout(config, cfg.model.dropout)
    if task == "causal_lm":
        config.use_cache = False

    if (bundle := build_for_head_init(cfg, task, path, config, labels)) is not None:
        return bundle  # CLIP with a zero-shot head on its image embedding (method.head_init)
    cls = _auto_class(task, config)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    quant = quantization_config(cfg)
    if path is None:
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        if quant is not None:
            raise ConfigError(
                "method.name=qlora quantises pretrained weights: give model.name_or_path, not tiny_config"
            )
        if dtype != "auto":
            model = model.to(dtype)
    elif task == "causal_lm" and _is_pruned(path):
        if quant is not None:
            raise ConfigError(
                f"method.name=qlora: '{path}' is a pruned folder with per-layer widths, which "
                "bitsandbytes cannot load; use method.name=lora with model.torch_dtype=bfloat16"
            )
        # Pruned folders have per-layer widths that a plain from_pretrained cannot build.
        model = load_pruned(path, torch_dtype=dtype, config=config)
    else:
        import transformers

        transformers.logging.set_verbosity_error()  # "newly initialised head" warnings are expected here
        require_safetensors(path, "model.name_or_path")
        model = cls.from_pretrained(
            path,
            config=config,
            use_safetensors=True,
            ignore_mismatched_sizes=True,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            dtype=dtype,
            **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else {}),
        )
        transformers.logging.set_verbosity_warning()
    if cfg.model.torch_dtype == "float32" and quant is None:
        model = model.float()
    bundle = ModelBundle(model=model, task=task, source=path or "tiny_config")
    if task in ("text_classification", "causal_lm"):
        bundle.tokenizer = load_tokenizer(cfg, path)
        if task == "text_classification" and model.config.pad_token_id is None:
            model.config.pad_token_id = bundle.tokenizer.pad_token_id
        if task == "causal_lm":
            set_end_token(model, bundle.tokenizer, cfg.data)
    else:
        bundle.image_spec = image_spec_for(model.config, path, cfg.data.image_size)
        bundle.image_spec.processor = make_image_processor(bundle.image_spec, model.config)
    return bundle


def _is_pruned(path: str) -> bool:
    return Path(path).is_dir() and is_pruned_folder(path)
