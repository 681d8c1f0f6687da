"""Build a model and its preprocessor from a hub id, a local folder or an inline tiny config, and map parameters
to layers.

The layer map (parameter name -> layer index, per model family) is what layer-wise LR decay, partial fine-tuning
and progressive unfreezing are computed from.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, ConfigError
from fulltune.files.safestate import require_safetensors
from fulltune.model.bundle import (
    ModelBundle,
    check_model_source,
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


def _check_heads(config: Any, tiny: dict[str, Any], where: str) -> None:
    """The attention heads split the hidden size (unless head_dim is given) and the key/value heads split the
    query heads, in the config and its sub-configs."""
    for name in ("", "vision_config", "text_config"):
        sub, given = (config, tiny) if not name else (getattr(config, name, None), tiny.get(name) or {})
        key = f"{where}.{name}." if name else f"{where}."
        heads, hidden = getattr(sub, "num_attention_heads", None), getattr(sub, "hidden_size", None)
        if isinstance(heads, int) and isinstance(hidden, int) and "head_dim" not in given and hidden % heads:
            raise ConfigError(
                f"config key '{key}num_attention_heads': {heads} heads do not split hidden_size {hidden} evenly; "
                "choose a divisor of hidden_size (or give head_dim)"
            )
        kv = getattr(sub, "num_key_value_heads", None)
        if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
            raise ConfigError(
                f"config key '{key}num_key_value_heads': {kv} key/value heads do not split {heads} attention heads "
                "evenly; choose a divisor of num_attention_heads"
            )


def _tiny_config(tiny: dict[str, Any]) -> Any:
    """The transformers config of model.tiny_config, every size and head count checked, each error naming the
    key."""
    from huggingface_hub import errors as hub_errors
    from transformers import CONFIG_MAPPING, AutoConfig

    tiny = dict(tiny)
    model_type = tiny.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.tiny_config needs a model_type (e.g. bert, clip, vit, llama)")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ConfigError(
            f"config key 'model.tiny_config.model_type': {model_type!r} is not a model type transformers knows"
            + (f"; did you mean {' or '.join(close)}?" if close else " (e.g. bert, clip, vit, llama)")
        )
    strict = getattr(hub_errors, "StrictDataclassError", ValueError)  # transformers' typed configs validate fields
    try:
        config = AutoConfig.for_model(model_type, **tiny)
    except (ValueError, TypeError, strict) as err:
        raise ConfigError(f"model.tiny_config: not a valid {model_type} config ({_first_line(err)})") from None
    _check_heads(config, tiny, "model.tiny_config")
    return config


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(err).__name__


def _load_config(cfg: Config, path: str | None) -> Any:
    from transformers import AutoConfig

    if cfg.model.tiny_config is not None:
        return _tiny_config(cfg.model.tiny_config)
    if Path(str(path)).is_dir():
        check_model_source(path, "model.name_or_path", cfg.model.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}': cannot load a model config "
            f"(not a local model folder, and the hub is unreachable or has no such model: {str(err).splitlines()[0]})"
        ) from None
    except ValueError as err:  # a config transformers cannot read: an unknown model type, custom code not trusted
        raise ConfigError(f"model.name_or_path '{cfg.model.name_or_path}': {_first_line(err)}") from None


def _auto_class(task: str, config: Any) -> Any:
    import transformers as tf

    if task == "image_classification":
        if config.model_type in ("clip", "clip_vision_model"):
            return tf.CLIPForImageClassification
        return tf.AutoModelForImageClassification
    if task in ("text_classification", "multi_label_classification", "text_regression"):
        return tf.AutoModelForSequenceClassification
    if task == "causal_lm":
        return tf.AutoModelForCausalLM
    if task == "token_classification":
        return tf.AutoModelForTokenClassification
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
    if task == "multi_label_classification":  # transformers' own loss for this head is then BCE, as here
        config.problem_type = "multi_label_classification"
    elif task == "text_regression":  # one output, and transformers' own regression loss for whoever loads it
        config.problem_type = "regression"
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
    text_tasks = ("text_classification", "multi_label_classification", "text_regression", "token_classification")
    if task in (*text_tasks, "causal_lm"):
        _check_length(cfg, task, model)
        bundle.tokenizer = load_tokenizer(cfg, path)
        if task != "causal_lm" and model.config.pad_token_id is None:
            model.config.pad_token_id = bundle.tokenizer.pad_token_id
        if task == "causal_lm":
            set_end_token(model, bundle.tokenizer, cfg.data)
    else:
        bundle.image_spec = image_spec_for(model.config, path, cfg.data.image_size)
        bundle.image_spec.processor = make_image_processor(bundle.image_spec, model.config)
    return bundle


def _is_pruned(path: str) -> bool:
    return Path(path).is_dir() and is_pruned_folder(path)


def position_limit(model: nn.Module) -> int | None:
    """How many tokens the model's learned position table holds (BERT, RoBERTa, GPT-2, OPT: its rows, less the ones
    a padding offset reserves); None for models without one (rotary or relative positions: Llama, Qwen2, DeBERTa)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            reserved = module.padding_idx + 1 if module.padding_idx is not None else 0  # RoBERTa counts from pad + 1
            return module.num_embeddings - max(reserved, int(getattr(module, "offset", 0)))  # OPT: offset 2
    return None


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def _check_length(cfg: Config, task: str, model: nn.Module) -> None:
    """The tokens per example (data.max_length) or per block (data.seq_len) fit the model's position table."""
    d = cfg.data
    key, length = ("data.seq_len", d.seq_len) if task == "causal_lm" else ("data.max_length", d.max_length)
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ConfigError(
            f"config key '{key}': {length} tokens, but the model's position table holds {limit} "
            f"(max_position_embeddings); set {key} <= {limit}"
        )


def check_vocabulary(cfg: Config, bundle: ModelBundle) -> None:
    """A text model's embedding has a row for every token id its tokenizer gives: a tiny_config's vocab_size, or
    one paired with another model's tokenizer (model.tokenizer), must be at least the tokenizer's size."""
    if bundle.tokenizer is None or (cfg.model.tiny_config is None and cfg.model.tokenizer is None):
        return
    rows = bundle.model.get_input_embeddings().num_embeddings
    if len(bundle.tokenizer) > rows:
        key = "model.tiny_config.vocab_size" if cfg.model.tiny_config is not None else "model.tokenizer"
        raise ConfigError(
            f"config key '{key}': the model's embedding has {rows} rows, but its tokenizer "
            f"({bundle.tokenizer.name_or_path}) has {len(bundle.tokenizer)} tokens; set vocab_size >= "
            f"{len(bundle.tokenizer)} or use a tokenizer of that size"
        )
