"""Model cards: the README.md of every exported folder (best/, checkpoints, compare's runs, pruned and recovered
models, `fulltune export`): base model, task, labels, data, method and key hyper-parameters, metrics with their
split, how to load it with plain transformers, and limits. Rendered from the folder's fulltune_run.json facts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fulltune.config.sections import ModelConfig
from fulltune.data.multilabel import THRESHOLDS_FILE
from fulltune.data.records import split_size
from fulltune.files.manifest import replace_in_checkpoint
from fulltune.model.pruned import is_pruned_folder

CARD_FILE = "README.md"
PIPELINE_TAGS = {
    "text_classification": "text-classification",
    "multi_label_classification": "text-classification",
    "text_regression": "text-classification",
    "image_classification": "image-classification",
    "causal_lm": "text-generation",
    "token_classification": "token-classification",
}
TEXT_TASKS = ("text_classification", "multi_label_classification", "text_regression")
"""The tasks of a sequence classifier over tokenised text (one or two texts in, class scores or a number out)."""
AUTO_CLASSES = {
    "text_classification": "AutoModelForSequenceClassification",
    "multi_label_classification": "AutoModelForSequenceClassification",
    "text_regression": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
    "causal_lm": "AutoModelForCausalLM",
    "token_classification": "AutoModelForTokenClassification",
}


def card_facts(cfg: Any, data: Any, state: Any) -> dict[str, Any]:
    """What a card needs beyond the config, gathered by the trainer for each export: data sizes and source, the
    latest validation metrics."""
    d = cfg.data
    source: dict[str, Any] = {}
    if d.dataset_name:
        source = {"dataset_name": d.dataset_name, "dataset_config": d.dataset_config, "train_split": d.train_split}
    else:
        source = {k: getattr(d, k) for k in ("data_dir", "train_file", "val_file", "test_file") if getattr(d, k)}

    sizes = {w: split_size(getattr(data, w)) for w in ("train", "val", "test") if getattr(data, w) is not None}
    facts: dict[str, Any] = {"data": {"source": source, "sizes": sizes, "val_source": data.info.get("val_source")}}
    if state.history:
        facts["last_val"] = state.history[-1]
    return facts


def _base_model(config: dict[str, Any]) -> str:
    model = config.get("model", {})
    words = ModelConfig(name_or_path=str(model.get("name_or_path")), tiny_config=model.get("tiny_config")).describe()
    return words if model.get("tiny_config") else f"`{words}`"


def _hub_base_model(config: dict[str, Any]) -> str | None:
    """The base model's hub id for the card's metadata (not a local folder, not a random init)."""
    model = config.get("model", {})
    name = model.get("name_or_path")
    if model.get("tiny_config") or not name or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    return name


def _hyper_parameters(config: dict[str, Any], task: str) -> list[tuple[str, Any]]:
    t, d, m = config.get("training", {}), config.get("data", {}), config.get("method", {})
    rows: list[tuple[str, Any]] = [
        ("method", m.get("name")),
        ("learning rate (peak)", t.get("base_learning_rate")),
        ("schedule", f"{t.get('lr_scheduler')}, warmup {t.get('warmup_steps') or t.get('warmup_ratio')}"),
        ("epochs / max steps", f"{t.get('num_epochs')} / {t.get('max_steps')}"),
        ("micro-batch x accumulation", f"{d.get('batch_size')} x {t.get('gradient_accumulation_steps')}"),
        ("weight decay", t.get("weight_decay")),
        ("max grad norm", t.get("max_grad_norm")),
        ("label smoothing", t.get("label_smoothing")),
        ("precision", config.get("hardware", {}).get("mixed_precision")),
        ("memory mode", t.get("memory")),
        ("seed", t.get("seed")),
    ]
    if m.get("name") == "partial":
        rows.append(("trainable top blocks", m.get("trainable_layers")))
    if m.get("name") == "lora":
        lora = m.get("lora", {})
        rows.append(("LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}"))
    if t.get("layerwise_lr", {}).get("enabled"):
        rows.append(("layer-wise LR decay", t["layerwise_lr"].get("decay_rate")))
    if t.get("progressive_unfreezing", {}).get("enabled"):
        rows.append(("progressive unfreezing", "on"))
    if task in TEXT_TASKS:
        rows.append(("max tokens per text", d.get("max_length")))
    elif task == "causal_lm":
        rows.append(("tokens per block", d.get("seq_len")))
    return rows


def training_length(meta: dict[str, Any]) -> int | None:
    """The tokens per text that training kept (a text classifier's data.max_length), from a run record; None for
    the other tasks (images have their size in the image processor; a causal LM's prompts are not cut)."""
    task = meta.get("task") or (meta.get("fulltune_config") or {}).get("task")
    if task not in TEXT_TASKS:
        return None
    length = ((meta.get("fulltune_config") or {}).get("data") or {}).get("max_length")
    return int(length) if length is not None else None


def _threshold(meta: dict[str, Any]) -> float:
    """The run's eval.threshold (multi-label), 0.5 in a record without one."""
    return float(((meta.get("fulltune_config") or {}).get("eval") or {}).get("threshold") or 0.5)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _metric_rows(meta: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    if meta.get("val_metrics"):
        rows.append(
            ("validation", f"best of the run, optimizer step {meta.get('optimizer_step')}", meta["val_metrics"])
        )
    elif meta.get("last_val"):
        last = {k: v for k, v in meta["last_val"].items() if k not in ("step", "epoch")}
        rows.append(("validation", f"latest evaluation, optimizer step {meta['last_val'].get('step')}", last))
    if meta.get("test_metrics"):
        rows.append(("test", "these weights", meta["test_metrics"]))
    for name, metrics in (meta.get("extra_metrics") or {}).items():
        rows.append((name, "", metrics))
    return rows


def _load_snippet(task: str, meta: dict[str, Any]) -> str:
    cls = AUTO_CLASSES.get(task, "AutoModel")
    if meta.get("pruned_layout"):
        return (
            "This folder keeps the pruned per-layer widths, which plain `from_pretrained` cannot build. Load it with\n"
            "fulltune, or make a plain-transformers copy with `fulltune export THIS_FOLDER --output_dir DIR`:\n\n"
            '```python\nfrom fulltune.model.pruned import load_pruned\nmodel = load_pruned("PATH")\n```\n'
        )
    if meta.get("adapter_only"):
        return (
            "This folder holds a LoRA adapter (peft), not full weights:\n\n```python\n"
            "from peft import AutoPeftModelFor"
            f"{cls.removeprefix('AutoModelFor') if task != 'image_classification' else 'CausalLM'} as Model\n"
            'model = Model.from_pretrained("PATH")  # fetches the base model named in adapter_config.json\n```\n'
        )
    if task == "image_classification":
        body = (
            "from PIL import Image\nfrom transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
            'processor = AutoImageProcessor.from_pretrained("PATH")\n'
            'model = AutoModelForImageClassification.from_pretrained("PATH")\n'
            'logits = model(**processor(Image.open("photo.jpg"), return_tensors="pt")).logits\n'
            "print(model.config.id2label[int(logits.argmax(-1))])"
        )
    elif task == "multi_label_classification":
        body = (
            "import json, os\n\nimport torch\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'tokenizer = AutoTokenizer.from_pretrained("PATH")\n'
            'model = AutoModelForSequenceClassification.from_pretrained("PATH")  # problem_type: multi-label\n'
            'probs = torch.sigmoid(model(**tokenizer(["a text"], truncation=True, return_tensors="pt")).logits)[0]\n'
            "names = [model.config.id2label[i] for i in range(len(probs))]\n"
            f'tuned = "PATH/{THRESHOLDS_FILE}"  # per-label thresholds, when tuned on validation\n'
            'limit = json.load(open(tuned))["thresholds"] if os.path.exists(tuned) else dict.fromkeys(names, '
            f"{_threshold(meta)})\n"
            "print([(n, float(p)) for n, p in zip(names, probs) if p >= limit[n]])"
        )
    elif task == "causal_lm":
        body = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'tokenizer = AutoTokenizer.from_pretrained("PATH")\nmodel = AutoModelForCausalLM.from_pretrained("PATH")\n'
            'ids = model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=40)\n'
            "print(tokenizer.decode(ids[0]))"
        )
    elif task == "token_classification":
        body = (
            "from transformers import pipeline\n\n"
            '# aggregation_strategy="first": each word takes the tag of its first sub-token, as in training.\n'
            'tagger = pipeline("token-classification", model="PATH", aggregation_strategy="first")\n'
            'print(tagger("John lives in Paris"))'
        )
    else:
        max_len = training_length(meta)
        pair = ((meta.get("fulltune_config") or {}).get("data") or {}).get("text_pair_column")
        texts = '["a first text"], ["its second text"]' if pair else '["a text to classify"]'  # a sentence pair
        out = (
            "float(logits.detach()[0, 0])"
            if task == "text_regression"
            else "model.config.id2label[int(logits.argmax(-1))]"
        )
        body = (
            f"from transformers import AutoTokenizer, {cls}, pipeline\n\n"
            'classifier = pipeline("text-classification", model="PATH")\n'
            f"# truncation=True: cut a text at the {max_len} tokens training kept (the tokenizer's model_max_length);\n"
            "# without it transformers keeps every token, in a pipeline too.\n"
            + (
                'print(classifier({"text": "a first text", "text_pair": "its second text"}, truncation=True))\n\n'
                if pair
                else 'print(classifier("a text to classify", truncation=True))\n\n'
            )
            + "# Or the tokenizer and model themselves:\n"
            'tokenizer = AutoTokenizer.from_pretrained("PATH")\n'
            f'model = {cls}.from_pretrained("PATH")\n'
            f'logits = model(**tokenizer({texts}, truncation=True, return_tensors="pt")).logits\n'
            f"print({out})"
        )
    return f"With plain `transformers` (fulltune is not needed), PATH being this folder:\n\n```python\n{body}\n```\n"


def _limits(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    task = meta.get("task")
    sizes = (meta.get("data") or {}).get("sizes") or {}
    out = []
    if sizes.get("train") is not None:
        out.append(
            f"Fine-tuned on {sizes['train']:,} training examples: expect it to do well only on data like "
            "them (same domain, language, label set and input length or image kind)."
        )
    if config.get("model", {}).get("tiny_config"):
        out.append("The base was a randomly initialised test-sized model: this is not a useful model.")
    if task in ("text_classification", "image_classification"):
        out.append(
            "It always answers with one of its labels, even for inputs that belong to none of them; "
            "its probabilities are not calibrated."
        )
    if task == "multi_label_classification":
        tuned = meta.get("thresholds")
        out.append(
            "It predicts every label whose sigmoid probability reaches that label's threshold: "
            + (
                f"{THRESHOLDS_FILE} holds one per label, tuned for F1 on the validation split (optimistic there)."
                if tuned
                else f"{_threshold(meta)} for each label (eval.threshold)."
            )
            + " Its probabilities are not calibrated."
        )
    if task in TEXT_TASKS:
        max_len = training_length(meta)
        out.append(
            f"Training kept the first {max_len} tokens of each text (data.max_length), and so does the tokenizer "
            f"here when asked to truncate (its model_max_length is {max_len}): pass `truncation=True`, as above; "
            "transformers keeps every token of a longer text otherwise, and the model then sees more than it was "
            "trained on (or fails past its position table)."
        )
    if meta.get("pruned_layout") or meta.get("pruned"):
        out.append(
            "Structured pruning removes attention groups and MLP channels: measure perplexity and your own "
            "task before use; recovery training on a small set only partly restores the original quality."
        )
    out.append(
        "Metrics above come from the splits named, not from an independent benchmark; the model inherits "
        "the biases of its base model and of its training data. Not for decisions about people."
    )
    return out


def render(meta: dict[str, Any]) -> str:
    """The README.md text of an exported folder, from its fulltune_run.json facts."""
    config = meta.get("fulltune_config") or {}
    task = meta.get("task") or config.get("task") or "?"
    labels = meta.get("labels")
    data = meta.get("data") or {}
    front = ["---", "library_name: transformers", "tags:", "- fulltune", f"- {PIPELINE_TAGS.get(task, task)}"]
    if task in PIPELINE_TAGS:
        front.append(f"pipeline_tag: {PIPELINE_TAGS[task]}")
    base = _hub_base_model(config)
    if base:
        front.append(f"base_model: {base}")
    hub_data = (data.get("source") or {}).get("dataset_name")
    if hub_data and not Path(str(hub_data)).exists():
        front += ["datasets:", f"- {hub_data}"]
    front.append("---")
    title = meta.get("title") or f"{task.replace('_', ' ')} fine-tuned with fulltune ({meta.get('method', '?')})"
    lines = [*front, "", f"# {title}", ""]
    lines += ["## Model", "", f"- Base model: {_base_model(config)}", f"- Task: {task}"]
    if labels and task == "text_regression":
        lines.append(f"- Output: one number, the `{labels[0]}` column's (problem_type regression)")
    elif labels:
        lines.append(f"- Labels ({len(labels)}): " + ", ".join(f"`{lb}`" for lb in labels))
    if meta.get("total_parameters"):
        lines.append(f"- Parameters: {meta['total_parameters']:,} ({meta.get('trainable_parameters', 0):,} trained)")
    if meta.get("optimizer_step") is not None:
        lines.append(f"- Weights after optimizer step {meta['optimizer_step']} (epoch {meta.get('epoch')})")
    for note in meta.get("notes") or []:
        lines.append(f"- {note}")
    lines += ["", "## Data", ""]
    source = data.get("source") or {}
    if source:
        lines += [f"- {k}: `{v}`" for k, v in source.items() if v is not None]
    if data.get("sizes"):
        sizes = ("streamed" if v is None else f"{v:,}" for v in data["sizes"].values())
        lines.append("- Examples: " + ", ".join(f"{k} {v}" for k, v in zip(data["sizes"], sizes, strict=True)))
    if data.get("val_source"):
        lines.append(f"- Validation split: {data['val_source']}")
    if not source and not data.get("sizes"):
        lines.append("- Not recorded for this folder.")
    if config:
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _hyper_parameters(config, task)]
        lines.append("\nThe full configuration is in `fulltune_run.json` (`fulltune_config`).")
    lines += ["", "## Metrics", ""]
    metric_rows = _metric_rows(meta)
    if metric_rows:
        lines += ["| split | weights | metric | value |", "|---|---|---|---|"]
        for split, which, metrics in metric_rows:
            lines += [
                f"| {split} | {which} | {k} | {_fmt(v)} |"
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and k not in ("step", "epoch")
            ]
    else:
        lines.append("No evaluation was recorded for these weights.")
    lines += ["", "## How to load", "", _load_snippet(task, meta), "## Limits", ""]
    lines += [f"- {text}" for text in _limits(meta, config)]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, meta: dict[str, Any]) -> Path:
    """README.md in `folder` (already holding config.json): a pruned layout is told apart from config.json."""

    if is_pruned_folder(folder):
        meta = {**meta, "pruned_layout": True}
    adapter = Path(folder) / "adapter"
    if (adapter / "adapter_config.json").is_file():  # a LoRA run: merged weights here, the adapter alone below
        meta = {
            **meta,
            "notes": [
                *(meta.get("notes") or []),
                "LoRA adapter merged into these weights; the adapter alone (peft) is in adapter/.",
            ],
        }
        (adapter / CARD_FILE).write_text(render({**meta, "adapter_only": True}), encoding="utf-8")
    path = Path(folder) / CARD_FILE
    path.write_text(render(meta), encoding="utf-8")
    return path


def refresh_with_test(run_dir: Path) -> None:
    """After the test split is measured (summary.json), add its metrics to the card of the weights it measured."""
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    test = summary.get("test")
    if not test:
        return
    if test.get("weights") == "best":
        folder = Path(run_dir) / "best"
    elif summary.get("last_checkpoint"):
        folder = Path(summary["last_checkpoint"])
    else:
        return
    meta_path = folder / "fulltune_run.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    meta["test_metrics"] = {k: v for k, v in test.items() if k != "weights"}
    # The record and its manifest entry change together; the card (README.md, outside the manifest) after them.
    replace_in_checkpoint(folder, meta_path.name, json.dumps(meta, indent=2, default=str))
    write_model_card(folder, meta)


def pruned_meta(base: str, report: dict[str, Any] | None, total_parameters: int | None = None) -> dict[str, Any]:
    """Card facts of a `fulltune prune` output folder (`base`: the model it was pruned from)."""
    meta: dict[str, Any] = {
        "task": "causal_lm",
        "method": "structured pruning",
        "pruned": True,
        "pruned_layout": True,
        "title": f"{base} structurally pruned with fulltune",
        "labels": None,
        "fulltune_config": {"model": {"name_or_path": base}, "task": "causal_lm"},
        "total_parameters": total_parameters,
        "trainable_parameters": 0,
    }
    if report is not None:
        cfg = report.get("config", {})
        meta["notes"] = [
            f"Pruned from {report['params_before']:,} to {report['params_after']:,} parameters "
            f"(ratio {cfg.get('pruning_ratio')}, importance {cfg.get('importance')}, "
            f"MLP pruned: {cfg.get('prune_mlp')},"
            f" layers {report.get('layer_range')})",
            "No training after pruning in this folder (recovery training, if run, is in recovery/).",
        ]
    return meta
