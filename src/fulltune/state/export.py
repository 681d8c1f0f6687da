"""`fulltune export RUN_OR_CHECKPOINT --output_dir DIR`: a clean folder to ship. Weights in the dtype asked, LoRA
merged or kept as an adapter, pruned models padded back to uniform layer widths so plain transformers builds them
(the padding is zeros and changes no output), the tokenizer (its model_max_length the training length) or image
processor, fulltune_run.json and a model card; no optimizer, RNG or trainer state. `--push_to_hub REPO` uploads it
with huggingface_hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import ConfigError
from fulltune.data.multilabel import write_thresholds
from fulltune.files.manifest import MANIFEST, RUN_META, verify_checkpoint
from fulltune.files.rundir import atomic_output, claim_output
from fulltune.files.safestate import require_safetensors
from fulltune.model.bundle import check_model_source
from fulltune.model.pruned import is_pruned_folder, load_pruned
from fulltune.model.pruning import SHAPES_KEY, _head_dim, decoder_layers, get_layer_shapes
from fulltune.state.checkpoint import list_checkpoints, write_training_length
from fulltune.state.modelcard import pruned_meta, write_model_card

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a shipped folder carries besides the weights: tokenizer and image processor files (copied as they are).
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_source(source: str | Path) -> Path:
    """The exported folder behind a run folder, checkpoint, best/ or prune output."""

    p = Path(source)
    if not p.is_dir():
        raise ConfigError(f"export: '{p}' is not a folder")
    if (p / RUN_META).is_file() or is_pruned_folder(p):
        return p
    results = p / "prune_results.json"
    if results.is_file():  # a `fulltune prune` output: the recovered model if there is one, else pruned/
        recovered = json.loads(results.read_text()).get("recovered_model")
        if recovered and Path(recovered).is_dir():
            return Path(recovered)
        if is_pruned_folder(p / "pruned"):
            return p / "pruned"
    if (p / "best" / RUN_META).is_file():
        return p / "best"
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise ConfigError(
        f"export: '{p}' is not a run folder, checkpoint or exported model (no {RUN_META}, best/ or checkpoint-*/ in it)"
    )


def _read_meta(src: Path) -> dict[str, Any]:
    if (src / RUN_META).is_file():
        return json.loads((src / RUN_META).read_text())
    # A pruned/ folder of `fulltune prune`: no run behind it.
    report_file = src / "fulltune_prune_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    base = json.loads((src / "config.json").read_text()).get("_name_or_path") or str(src)
    return pruned_meta(base, report)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros((rows - w.shape[0], *w.shape[1:]))]) if rows > w.shape[0] else w


def _pad_cols(w: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros((w.shape[0], cols - w.shape[1]))], dim=1) if cols > w.shape[1] else w


def unprune(model: nn.Module) -> nn.Module:
    """A plain transformers model equal to a pruned one: every layer zero-padded to the widest layer's query heads,
    KV groups and MLP channels. A zero KV group gives zero values and meets zero o_proj columns; a zero MLP channel
    gives act(0) * 0 = 0 into zero down_proj columns; so every output is unchanged."""
    from transformers import AutoModelForCausalLM

    shapes = get_layer_shapes(model)
    n_q = max(s["num_attention_heads"] for s in shapes)
    n_kv = max(s["num_key_value_heads"] for s in shapes)
    inter = max(s["intermediate_size"] for s in shapes)
    layers = decoder_layers(model)
    hd = _head_dim(layers[0].self_attn)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, SHAPES_KEY):
        delattr(config, SHAPES_KEY)
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = n_q, n_kv, inter
    config.head_dim = hd  # hidden_size / heads no longer gives it
    state = dict(model.state_dict())
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i in range(len(layers)):
        a, m = f"{prefix}.{i}.self_attn", f"{prefix}.{i}.mlp"
        for proj, rows in (("q_proj", n_q * hd), ("k_proj", n_kv * hd), ("v_proj", n_kv * hd)):
            state[f"{a}.{proj}.weight"] = _pad_rows(state[f"{a}.{proj}.weight"], rows)
            if f"{a}.{proj}.bias" in state:
                state[f"{a}.{proj}.bias"] = _pad_rows(state[f"{a}.{proj}.bias"], rows)
        state[f"{a}.o_proj.weight"] = _pad_cols(state[f"{a}.o_proj.weight"], n_q * hd)
        for proj in ("gate_proj", "up_proj"):
            state[f"{m}.{proj}.weight"] = _pad_rows(state[f"{m}.{proj}.weight"], inter)
        state[f"{m}.down_proj.weight"] = _pad_cols(state[f"{m}.down_proj.weight"], inter)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise ConfigError(
            f"export: the padded pruned model does not fit {type(plain).__name__} "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def _load_plain(src: Path, task: str) -> tuple[nn.Module, bool]:
    """The folder's model in float32, and whether it was a pruned layout (now padded)."""
    import transformers as tf

    if is_pruned_folder(src):
        return unprune(load_pruned(src, torch_dtype=torch.float32)), True
    cls = {
        "image_classification": tf.AutoModelForImageClassification,
        "causal_lm": tf.AutoModelForCausalLM,
        "token_classification": tf.AutoModelForTokenClassification,
    }.get(task, tf.AutoModelForSequenceClassification)
    return cls.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True).eval(), False


def _copy_processors(src: Path, dst: Path) -> None:
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _export_adapter(src: Path, tmp: Path, dtype: torch.dtype, meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file, save_file

    adapter = src / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"export --lora adapter: '{src}' holds no LoRA adapter (adapter/); the run's method was "
            f"{meta.get('method')}: use --lora merged"
        )
    shutil.copy2(adapter / "adapter_config.json", tmp / "adapter_config.json")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})


def export(source: str | Path, output_dir: str | Path, dtype: str = "float32", lora: str = "merged") -> Path:
    """Write the shippable folder; return its path."""
    if dtype not in DTYPES:
        raise ConfigError(f"export --dtype {dtype}: expected one of {', '.join(DTYPES)}")
    src = resolve_source(source)
    out = Path(output_dir)
    claim_output(out, "export", inputs=(source, src))
    require_safetensors(src, "export: the source")  # a pickle is named as such, before any other check
    if (src / MANIFEST).is_file():  # a checkpoint or best/: ship it only whole (a pruned folder has no manifest)
        verify_checkpoint(src, resumable=False)
    check_model_source(src, "export: the source")  # with or without a manifest: JSON parses, weights whole
    meta = _read_meta(src)
    task = meta.get("task", "causal_lm")
    with atomic_output(out, "export") as tmp:
        notes = [f"Exported by `fulltune export` from `{src}`, weights in {dtype}."]
        if lora == "adapter":
            _export_adapter(src, tmp, DTYPES[dtype], meta)
            meta["adapter_only"] = True
            notes.append("LoRA adapter only (peft): load it on top of the base model named in adapter_config.json.")
        else:
            model, padded = _load_plain(src, task)
            model.to(DTYPES[dtype]).save_pretrained(str(tmp))
            meta["total_parameters"] = meta.get("total_parameters") or sum(p.numel() for p in model.parameters())
            if (src / "adapter").is_dir():
                notes.append("The LoRA adapter is merged into these weights.")
            if padded:
                notes.append(
                    "A pruned model, zero-padded to uniform layer widths so plain transformers builds it "
                    "(same outputs; the file is as large as the widest layer times the number of layers)."
                )
                meta["pruned_layout"] = False
        _copy_processors(src, tmp)
        write_training_length(tmp, meta)  # a source folder may still carry the base model's length
        meta["notes"] = [*meta.get("notes", []), *notes]
        meta["export"] = {"source": str(src), "dtype": dtype, "lora": lora}
        (tmp / RUN_META).write_text(json.dumps(meta, indent=2, default=str))
        write_thresholds(tmp, meta)
        write_model_card(tmp, meta)
    return out


def hub_token() -> str:
    """The Hugging Face token an upload will use; offline mode or no token is a one-line ConfigError."""
    import huggingface_hub as hub

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ConfigError("export --push_to_hub: HF_HUB_OFFLINE is set; unset it to upload")
    token = hub.get_token()
    if not token:
        raise ConfigError("export --push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    return token


def push_to_hub(folder: Path, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload `folder` to a Hugging Face model repo; a missing token or network is a one-line ConfigError."""
    import huggingface_hub as hub

    api = hub.HfApi(token=token or hub_token())
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload from fulltune export")
    except Exception as err:  # network, auth and permission errors all end the same way: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"export --push_to_hub {repo}: upload failed ({first})") from None
    return str(getattr(info, "commit_url", repo))
