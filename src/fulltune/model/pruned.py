"""Pruned models on disk: a standard transformers config where every layer keeps one shape, otherwise
fulltune's per-layer shape record (`fulltune_layer_shapes`), and the loader for such a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.files.safestate import require_safetensors
from fulltune.model.pruning import (
    SHAPES_KEY,
    _head_dim,
    _set_attention_attrs,
    decoder_layers,
    get_layer_shapes,
)

NONSTANDARD_KEY = "fulltune_nonstandard_reason"
"""config.json key of a per-layer record: why a standard transformers config cannot describe the layers."""
UNEVEN_NOTE = (
    "The layers of this pruned model have shapes a standard transformers config cannot describe: "
    "AutoModelForCausalLM.from_pretrained fails on it with size mismatches. Load it with fulltune "
    "(fulltune.model.pruned.load_pruned, or any fulltune command: evaluate, predict, train, prune); config.json "
    "records "
    f"each layer's heads and MLP width under {SHAPES_KEY!r}."
)


UNIFORM_NOTE = (
    "Every layer of this pruned model has one shape: config.json is a standard transformers config "
    "(AutoModelForCausalLM.from_pretrained loads it as is)."
)
AS_MISTRAL_NOTE = (
    " It is written as a MistralForCausalLM config: the same decoder as Llama's (rotary attention with grouped "
    "key/value heads, SwiGLU MLP, RMSNorm) and the same weight names, but transformers' LlamaConfig refuses a "
    "hidden_size that the query-head count does not divide ({reason}), which MistralConfig, with head_dim stated, "
    "allows."
)
"""Appended to UNIFORM_NOTE where a pruned Llama is written under Mistral's config (see `standard_config`)."""


def _config_error(err: Exception) -> str:
    """The one-line reason inside a config class's refusal (huggingface_hub's strict dataclasses wrap it)."""
    cause = err.__cause__ or err
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__


def _mistral_config(values: dict[str, Any]) -> Any | None:
    """A Llama config's values as a MistralConfig that builds the same modules, or None where a Llama option
    (attention or MLP bias, tensor-parallel pretraining slices) has no Mistral equivalent."""
    from transformers import MistralConfig

    if values.get("attention_bias") or values.get("mlp_bias") or (values.get("pretraining_tp") or 1) != 1:
        return None
    dropped = {"model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version"}
    config = MistralConfig.from_dict({k: v for k, v in values.items() if k not in dropped} | {"sliding_window": None})
    config.architectures = ["MistralForCausalLM"]
    return config


def standard_config(model: nn.Module) -> tuple[Any | None, str]:
    """The standard transformers config of a pruned model whose layers all have one shape (head counts, MLP width,
    head_dim stated), and a note for its README; (None, why) where the layers differ.

    A Llama whose query heads no longer divide hidden_size (25% of Llama-3-8B's 8 KV groups leaves 24 of 32 heads)
    is refused by LlamaConfig's own check, although its modules take head_dim from the config: it is described by
    MistralConfig, whose decoder is Llama's module for module, so plain AutoModelForCausalLM loads every uniform ratio.
    """
    shapes = get_layer_shapes(model)
    if any(s != shapes[0] for s in shapes):
        return None, "layers have different widths"
    config = model.config
    values = {k: v for k, v in config.to_dict().items() if k not in (SHAPES_KEY, NONSTANDARD_KEY)}
    values |= dict(shapes[0]) | {"head_dim": _head_dim(decoder_layers(model)[0].self_attn)}
    try:
        return type(config).from_dict(values), UNIFORM_NOTE
    except Exception as err:  # a strict config's validators (huggingface_hub wraps their ValueError)
        reason = _config_error(err)
    as_mistral = _mistral_config(values) if config.model_type == "llama" else None
    if as_mistral is None:
        return None, f"{type(config).__name__} refuses this shape: {reason}"
    return as_mistral, UNIFORM_NOTE + AS_MISTRAL_NOTE.format(reason=reason)


def record_layer_shapes(model: nn.Module, why: str) -> None:
    """Keep the per-layer shapes (and why a standard config cannot hold them) in ``model.config`` for `load_pruned`."""
    setattr(model.config, SHAPES_KEY, get_layer_shapes(model))
    setattr(model.config, NONSTANDARD_KEY, why)


def export_note(config: Any) -> dict[str, Any]:
    """What fulltune_run.json / README.md say about a pruned export's loading ({} for an unpruned model)."""
    if getattr(config, SHAPES_KEY, None) is not None:
        why = getattr(config, NONSTANDARD_KEY, None) or "layers have different widths"
        return {"pruned_layers": f"fulltune's per-layer record ({why})", "loading": f"{UNEVEN_NOTE} (Here: {why}.)"}
    return {}


def is_pruned_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder whose config.json carries fulltune's per-layer shapes."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        return SHAPES_KEY in json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f), device=str(device)))
    return state


def _meta_linear_resize(lin: nn.Linear, out_features: int, in_features: int) -> None:
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"))
    if lin.bias is not None:
        lin.bias = nn.Parameter(torch.empty(out_features, device="meta"))
    lin.out_features, lin.in_features = out_features, in_features


def load_pruned(
    path: str | Path,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config: Any | None = None,
) -> nn.Module:
    """Rebuild a model saved by `fulltune.prune.folder.save_pruned`: skeleton on the meta device, reshape each layer,
    load the weights.

    ``torch_dtype`` None (or "auto") keeps the stored dtype; a dtype (or its name) casts the floating weights as they
    are loaded. ``config``: the folder's config already loaded and edited (dropout, use_cache); default: read it.
    Never materialises the unpruned model, so peak memory is that of the pruned one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path) if config is None else config
    shapes = getattr(config, SHAPES_KEY, None)
    if shapes is None:  # uniformly pruned (or unpruned): a standard config, which transformers loads by itself
        dtype = torch_dtype if torch_dtype is not None else "auto"
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        require_safetensors(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
        return model.to(device).eval()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise ValueError(f"{SHAPES_KEY} has {len(shapes)} entries for {len(layers)} layers")
    for layer, shape in zip(layers, shapes, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        hd, hidden = _head_dim(attn), attn.q_proj.in_features
        n_q, n_kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        if n_q % n_kv:
            raise ValueError(f"layer shape {shape}: query heads not a multiple of kv heads")
        _meta_linear_resize(attn.q_proj, n_q * hd, hidden)
        _meta_linear_resize(attn.k_proj, n_kv * hd, hidden)
        _meta_linear_resize(attn.v_proj, n_kv * hd, hidden)
        _meta_linear_resize(attn.o_proj, hidden, n_q * hd)
        _set_attention_attrs(attn, n_q, n_kv)
        _meta_linear_resize(mlp.gate_proj, inter, hidden)
        _meta_linear_resize(mlp.up_proj, inter, hidden)
        _meta_linear_resize(mlp.down_proj, hidden, inter)
        mlp.intermediate_size = inter

    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = getattr(torch, torch_dtype)
    state = _read_safetensors(path, device)
    if isinstance(torch_dtype, torch.dtype):
        # cast the checkpoint, not the module: rotary inv_freq is rebuilt below and stays float32
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        config.dtype = torch_dtype
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not match the pruned layout: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}"
        )
    model.tie_weights()

    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild those modules for real.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise RuntimeError(f"module {name} ({type(module).__name__}) has buffers not in the checkpoint")
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):  # for real on `device` even inside a meta-device context (the planner's)
                setattr(parent, attr, type(module)(config=module.config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:8]}")

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model
