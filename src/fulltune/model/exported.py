"""Loading an exported folder (a checkpoint, `best/`, an export) for evaluation and prediction: verified against
its manifest, safetensors only, the model class its run record names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fulltune.config import ConfigError, DataConfig
from fulltune.files.manifest import MANIFEST, verify_checkpoint
from fulltune.files.rundir import recover_beside
from fulltune.model.bundle import (
    ModelBundle,
    check_model_source,
    image_spec_for,
    resolve_dtype,
    set_end_token,
)
from fulltune.model.clip import CLIPEmbeddingClassifier, is_embedding_classifier
from fulltune.model.pruned import is_pruned_folder, load_pruned


def load_exported(path: str | Path, device: torch.device | str = "cpu", torch_dtype: str | None = None) -> ModelBundle:
    """Load an exported checkpoint folder (save_pretrained + fulltune_run.json) for evaluation or prediction, in
    `torch_dtype` (auto, bfloat16, float16, float32; default: the run's model.torch_dtype, float32 when unset)."""
    import transformers as tf

    path = Path(path)
    meta_path = path / "fulltune_run.json"
    if not path.exists():  # a save killed between its two renames left the folder as .NAME.old-PID: put it back
        recover_beside(path)
    if not (path / "config.json").is_file() or not meta_path.is_file():
        raise ConfigError(
            f"checkpoint '{path}' is not a fulltune checkpoint (expected config.json and fulltune_run.json in it)"
        )

    if (path / MANIFEST).is_file():  # written by this fulltune: every file checked against its size and SHA-256
        verify_checkpoint(path, resumable=False)
    check_model_source(path, "checkpoint")  # with or without a manifest: JSON parses, headers whole, no remote code
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        task = meta["task"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"checkpoint '{path}': '{meta_path}' is damaged (not fulltune's run record)") from None
    known = (
        "causal_lm",
        "image_classification",
        "text_classification",
        "multi_label_classification",
        "text_regression",
    )
    if task not in (*known, "token_classification"):
        raise ConfigError(f"checkpoint '{path}': '{meta_path}' names an unknown task {task!r}")
    # Weights from safetensors only: a pickled pytorch_model.bin beside them is never read.
    safe = {"use_safetensors": True}
    # The run's model.torch_dtype (float32 unless set): bf16 runs evaluate and predict in bf16.
    name = torch_dtype or meta.get("fulltune_config", {}).get("model", {}).get("torch_dtype") or "float32"
    dtype = resolve_dtype(name)
    if task == "causal_lm":
        if is_pruned_folder(path):
            model = load_pruned(path, torch_dtype=dtype)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **safe)
    elif task == "image_classification":
        cls = CLIPEmbeddingClassifier if is_embedding_classifier(path) else tf.AutoModelForImageClassification
        model = cls.from_pretrained(str(path), dtype=dtype, **safe)
    elif task == "token_classification":
        model = tf.AutoModelForTokenClassification.from_pretrained(str(path), dtype=dtype, **safe)
    else:
        model = tf.AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype, **safe)
    model = model.to(device).eval()
    bundle = ModelBundle(model=model, task=task, source=str(path), extra=meta)
    if task == "image_classification":
        bundle.image_spec = image_spec_for(model.config, str(path), None)
        # Preprocess exactly as the folder's own processor does (what transformers' pipeline loads).
        bundle.image_spec.processor = tf.AutoImageProcessor.from_pretrained(str(path))
    else:
        bundle.tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
    if task == "causal_lm":  # an export saves its end token; a folder from before that gets the run's (or auto)
        eos = ((meta.get("fulltune_config") or {}).get("data") or {}).get("eos_token") or "auto"
        set_end_token(model, bundle.tokenizer, DataConfig(eos_token=eos))
    return bundle
