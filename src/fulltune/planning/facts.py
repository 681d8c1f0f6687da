"""What a memory estimate depends on: parameter counts and network shape of the model as training builds it (on
the meta device, so nothing is allocated), and the size of the training set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config
from fulltune.data import multilabel
from fulltune.data import tokens as tok
from fulltune.data.images import IMAGE_EXTENSIONS
from fulltune.data.text import cap, output_names, read_examples, split_files
from fulltune.errors import ConfigError, DataError
from fulltune.model.bundle import resolve_model_path
from fulltune.model.layermap import strip_peft_prefix
from fulltune.model.lora import LORA_METHODS
from fulltune.model.prepare import prepare_model
from fulltune.model.pruned import is_pruned_folder
from fulltune.model.trainable import apply_trainable
from fulltune.speed.plan import SpeedPlan
from fulltune.training.lean_tied import CHUNK_ELEMENTS, tied_embeddings, tied_step_blocker
from fulltune.training.lowbit import moment_block
from fulltune.training.tasks import infer_task


@dataclass(frozen=True)
class Facts:
    """What one method's memory depends on: parameter counts from fulltune's own model building and method plan
    (on the meta device), and the shape of the network (the vision tower's for CLIP)."""

    total: int
    trainable: int
    largest_trainable: int
    first_layer: int  # lowest layer (0 embeddings, 1..L blocks, L+1 head) with a trainable parameter
    weight_bytes: int
    block_linear_params: int  # weights of one block's linear layers (autocast keeps a low-precision copy)
    lora_rank: int
    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tokens: int  # per example: max_length (text), seq_len (causal LM), patches + 1 (images)
    pixels: int  # input floats per image, 0 for text
    activation: str
    rms_norm: bool
    gated: bool  # SwiGLU MLP (gate, up, down)
    attn_dropout: float
    hidden_dropout: float
    eager_attention: bool
    first_token: bool = False  # the speed plan's first_token_only: the last block computes the first token only
    trainable_sizes: tuple[int, ...] = ()  # elements of each trainable tensor (low-bit optimizers quantize per tensor)
    largest_fused_gradient: int = (
        0  # the largest gradient lean's fused step holds at once, where not the largest tensor
    )


def prepare(cfg: Config, task: str, labels: list[str] | None, device: torch.device) -> tuple[nn.Module, Any, SpeedPlan]:
    """The model exactly as `fulltune train` prepares it (`prepare_model`), with every parameter the method
    may ever train set trainable: progressive unfreezing ends there, so that is the peak to plan for; the plan of
    what trains, and the speed plan as applied."""

    bundle, model, plan = prepare_model(cfg, task, labels, device)
    apply_trainable(model, plan.eligible)
    assert bundle.speed is not None
    return model, plan, bundle.speed.plan


def _model_config(cfg: Config, path: str) -> Any:
    """The model's transformers config: its config.json alone (a hub id downloads nothing else)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path '{cfg.model.name_or_path}': cannot load a model config ({str(err).splitlines()[0]})"
        ) from None


def plan_task(cfg: Config) -> str:
    """The task to plan: as training infers it from the data; with no data given, a model whose config names a
    causal LM architecture plans as one (`fulltune plan --model meta-llama/Meta-Llama-3-8B` alone)."""
    d = cfg.data
    if cfg.task == "auto" and not (d.data_dir or d.train_file or d.dataset_name) and cfg.model.tiny_config is None:
        architectures = getattr(_model_config(cfg, resolve_model_path(cfg.model.name_or_path)), "architectures", None)
        if any(str(a).endswith("ForCausalLM") for a in architectures or ()):
            return "causal_lm"
    return infer_task(cfg)


def _meta_config(cfg: Config) -> Config:
    """The same model as an inline config, which build_model makes with from_config (so on the meta device) instead
    of reading weights. A pruned folder (per-layer widths) has no such config and is built for real."""
    path = None if cfg.model.tiny_config is not None else resolve_model_path(cfg.model.name_or_path)
    if path is None or (Path(path).is_dir() and is_pruned_folder(path)):
        return cfg
    config = _model_config(cfg, path)
    # The tokenizer changes no tensor's size: the model's own where its folder has one, else the packaged one, so
    # that a hub id costs its config.json alone and a folder holding only config.json is enough.
    own = Path(path).is_dir() and any((Path(path) / n).is_file() for n in TOKENIZER_FILES)
    return replace(
        cfg,
        model=replace(
            cfg.model, tiny_config=config.to_dict(), tokenizer=cfg.model.tokenizer or (path if own else None)
        ),
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _get(config: Any, *names: str, default: Any = None) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def loaded_bytes(cfg: Config, config: Any) -> int:
    """Bytes a parameter is loaded in: model.torch_dtype, or the checkpoint's dtype for "auto"."""
    name = cfg.model.torch_dtype
    if name == "auto":
        name = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return 2 if name in ("bfloat16", "float16") else 4


def _weight_bytes(cfg: Config, config: Any, params: dict[str, nn.Parameter], eligible: set[str]) -> int:
    """Weights as training holds them (`model.prepare.master_weights`): bf16 in lean mode; else fp32, except the
    frozen base of a LoRA run, which stays in the dtype it was loaded in."""
    if cfg.training.memory == "lean":
        return 2 * sum(p.numel() for p in params.values())
    frozen = loaded_bytes(cfg, config) if cfg.method.name in LORA_METHODS else 4
    return sum(p.numel() * (4 if n in eligible else frozen) for n, p in params.items())


def inspect_model(cfg: Config, task: str, labels: list[str] | None) -> Facts:
    """Facts of cfg.method.name's model: the trainable set is exactly the one `fulltune train` would train."""

    with torch.device("meta"):
        model, plan, speed = prepare(_meta_config(cfg), task, labels, torch.device("meta"))
    params = dict(model.named_parameters())  # deduplicates tied weights
    eligible = [params[n].numel() for n in plan.eligible]
    block = plan.lmap.block_prefixes[0] + "." if plan.lmap.block_prefixes else "\0"
    config = model.config
    if task == "image_classification" and getattr(config, "vision_config", None) is not None:
        config = config.vision_config
    h, heads = int(_get(config, "hidden_size", "n_embd", "dim")), int(_get(config, "num_attention_heads", "n_head"))
    tokens, pixels = (cfg.data.seq_len if task == "causal_lm" else cfg.data.max_length), 0
    if task == "image_classification":
        side = cfg.data.image_size or int(_get(config, "image_size", default=224))
        tokens, pixels = (side // int(_get(config, "patch_size", default=16))) ** 2 + 1, 3 * side * side
    return Facts(
        total=sum(p.numel() for p in params.values()),
        trainable=sum(eligible),
        largest_trainable=max(eligible),
        first_layer=min(plan.lmap.layer_of[n] for n in plan.eligible),
        weight_bytes=_weight_bytes(cfg, config, params, set(plan.eligible))
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        block_linear_params=sum(
            m.weight.numel()
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and strip_peft_prefix(n).startswith(block) and "lora_" not in n
        ),
        lora_rank=cfg.method.lora.r if cfg.method.name == "lora" else 0,
        family=plan.lmap.family,
        hidden=h,
        intermediate=int(_get(config, "intermediate_size", "n_inner", default=4 * h)),
        heads=heads,
        kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
        layers=int(_get(config, "num_hidden_layers", "n_layer")),
        vocab=int(_get(config, "vocab_size", default=0)),
        tokens=tokens,
        pixels=pixels,
        activation=str(_get(config, "hidden_act", "activation_function", default="gelu")),
        rms_norm=hasattr(config, "rms_norm_eps"),
        gated=any(n.endswith("gate_proj") for n, _ in model.named_modules()),
        attn_dropout=float(_get(config, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", default=0)),
        hidden_dropout=float(_get(config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", default=0)),
        eager_attention=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
        first_token=speed.on("first_token_only"),
        trainable_sizes=tuple(eligible),
        largest_fused_gradient=_largest_fused_gradient(cfg, model, eligible),
    )


def _largest_fused_gradient(cfg: Config, model: nn.Module, eligible: list[int]) -> int:
    """Where lean's fused step updates a tied embedding/head weight in vocabulary chunks (training/lean_tied.py),
    the largest gradient it holds: a chunk, or the largest other trainable tensor's. 0 where that does not apply."""
    t, tied = cfg.training, tied_embeddings(model)
    if t.memory != "lean" or tied is None or not tied[0].weight.requires_grad:
        return 0
    w = tied[0].weight
    if tied_step_blocker(*tied, moment_block(t.lean_optimizer, w.numel()), t.max_grad_norm):
        return 0
    others = list(eligible)
    if w.numel() in others:
        others.remove(w.numel())
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    return max([min(w.shape[0], rows) * w.shape[1], *others])


def count_examples(cfg: Config, task: str) -> tuple[int | None, list[str] | None, str]:
    """(training examples, class names, where the count came from) from file listings and the training table only;
    (None, None, why) when the data is not there."""

    d = cfg.data
    try:
        if task == "image_classification":
            root = Path(d.data_dir or "") / "train"
            if not d.data_dir or not root.is_dir():
                return None, None, f"no image folder '{root}'"
            n = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            n = n if (root.parent / "val").is_dir() else round(n * (1 - d.val_fraction))
            n = min(n, d.max_samples or n)  # the cap training applies
            return n, sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), str(root)
        if task == "causal_lm":
            found = [Path(d.train_file or "")] + [Path(d.data_dir or "") / n for n in ("train.txt", "train.jsonl")]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                return None, None, "no training text file"
            blocks = path.stat().st_size // (4 * d.seq_len)  # ~4 characters per token
            return min(blocks, d.max_samples or blocks), None, f"{path}, in {d.seq_len}-token blocks, from its size"
        if task == "token_classification":
            files = tok.split_files(d)
            sentences = tok.read_sentences(files["train"], d)
            n = len(sentences.words) if files["val"] else round(len(sentences.words) * (1 - d.val_fraction))
            n = min(n, d.max_samples or n)
            return n, tok.tag_vocabulary(sentences.tags), f"sentences of {files['train']}"
        files = split_files(d)
        if files["train"] is None:
            return None, None, "no training table"
        multi = task == "multi_label_classification"  # label sets: their names are the labels
        examples = (multilabel.read_examples if multi else read_examples)(files["train"], d)
        n = len(examples.texts) if files["val"] else round(len(examples.texts) * (1 - d.val_fraction))
        n = min(n, len(cap(examples, d.max_samples, cfg.training.seed).texts))
        regression = task == "text_regression"
        names = (
            multilabel.label_vocabulary(examples)
            if multi
            else output_names(examples.labels, d.label_column, regression)
        )
        return n, names, f"rows of {files['train']}"
    except (DataError, OSError) as err:
        return None, None, str(err).splitlines()[0]
