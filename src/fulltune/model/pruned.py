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


def make_config_standard(model: nn.Module) -> bool:
    """Where every layer has one shape, rewrite ``model.config`` as the standard config of that shape (head counts,
    MLP width, head_dim kept explicit) without fulltune's per-layer record, and return True; else record the
    per-layer shapes under SHAPES_KEY and return False."""
    shapes = get_layer_shapes(model)
    config = model.config
    why = standard_config_obstacle(config, shapes)
    if why:
        setattr(config, SHAPES_KEY, shapes)
        config.fulltune_nonstandard_reason = why
        return False
    head_dim = _head_dim(decoder_layers(model)[0].self_attn)
    if hasattr(config, "fulltune_nonstandard_reason"):
        delattr(config, "fulltune_nonstandard_reason")
    config.num_attention_heads = shapes[0]["num_attention_heads"]
    config.num_key_value_heads = shapes[0]["num_key_value_heads"]
    config.intermediate_size = shapes[0]["intermediate_size"]
    config.head_dim = head_dim
    if hasattr(config, SHAPES_KEY):
        delattr(config, SHAPES_KEY)
    return True


def standard_config_obstacle(config: Any, shapes: list[dict[str, int]]) -> str | None:
    """Why a standard transformers config cannot describe these layer shapes (None: it can)."""
    if any(s != shapes[0] for s in shapes):
        return "layers have different widths"
    n_q = shapes[0]["num_attention_heads"]
    if config.hidden_size % n_q:  # LlamaConfig (and its kin) validate hidden_size % num_attention_heads
        return (
            f"{n_q} query heads per layer do not divide hidden_size {config.hidden_size}, which transformers' "
            f"{type(config).__name__} requires"
        )
    return None


def export_note(config: Any) -> dict[str, Any]:
    """What fulltune_run.json / README.md say about a pruned export's loading ({} for an unpruned model)."""
    if getattr(config, SHAPES_KEY, None) is not None:
        why = getattr(config, "fulltune_nonstandard_reason", None) or "layers have different widths"
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
            setattr(parent, attr, type(module)(config=module.config).to(device))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:8]}")

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model
