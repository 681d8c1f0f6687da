"""fulltune from Python (a notebook, a script): `train`, `evaluate` and `predict` do what the commands do and return
values instead of printing them. A mistake raises the project's error (`fulltune.errors`: ConfigError, DataError,
...) with a message that names keyword arguments, not command-line flags; the libraries' progress bars stay off.

    import fulltune
    result = fulltune.train("configs/tiny_bert_text.yaml", data_dir="data", num_epochs=1)
    fulltune.predict(result.best_checkpoint, ["some text"], top_k=3)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulltune.cli import quiet_libraries
from fulltune.cli.options import ConfigFlags, require_training_data
from fulltune.config import Config, dotted_items, load_config, to_dict
from fulltune.errors import ConfigError, FulltuneError
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.eval.predict import classify, generate, image_paths, multi_label_rows, regress
from fulltune.eval.tagging import tag_sentences, tagged_row
from fulltune.model.exported import load_exported
from fulltune.runtime.device import resolve_device
from fulltune.training.trainer import train as run_training


@dataclass(frozen=True)
class TrainResult:
    """What `fulltune.train` returns."""

    run_dir: Path
    """The run folder: report.html, train.log, metrics.jsonl, summary.json, checkpoints."""
    best_checkpoint: Path | None
    """best/: the export with the best validation metric (None when the run had no validation split)."""
    metrics: dict[str, Any]
    """summary.json: best_val ({metric: value, step}), test (of best/) when there is a test split, timings."""


def _api_words(message: str) -> str:
    """A message written for the command line, in Python's words: `--resume auto` is resume="auto"."""
    message = message.replace("--resume auto", 'resume="auto"').replace("--overwrite", "overwrite=True")
    return re.sub(r"(?<![\w-])--(\w[\w.]*)", r"\1", message)


@contextmanager
def _as_api() -> Iterator[None]:
    """Library progress bars off; fulltune's errors re-worded for Python (same class, same traceback)."""
    quiet_libraries()
    try:
        yield
    except FulltuneError as err:
        err.args = (_api_words(str(err)),)
        raise


def _config(config: str | Path | Mapping[str, Any] | Config | None, overrides: Mapping[str, Any]) -> Config:
    """The validated config: a YAML path, a mapping laid out like one, or a Config, then the keyword overrides (any
    key, alias or unique last part of a key, as the command line's flags: num_epochs=2, learning_rate=1e-4)."""
    names = ConfigFlags()
    settings: dict[str, Any] = {"logging.progress_bar": False}  # a notebook cell gets the log lines, no live bar
    path = None
    if isinstance(config, (str, Path)):
        path = config
    elif isinstance(config, Config):
        settings.update(dotted_items(to_dict(config)))
    elif isinstance(config, Mapping):
        settings.update(dotted_items(dict(config)))
    elif config is not None:
        raise ConfigError(f"config: expected a YAML path, a mapping or a fulltune Config, got {type(config).__name__}")
    for name, value in overrides.items():
        key = names.key(name)
        if key is None:
            raise ConfigError(f"{name}={value!r}: not a config key (`fulltune config` lists them)")
        settings[key] = value
    return load_config(path, settings)


def train(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train as `fulltune train` does: `config` (a YAML path, a mapping or a Config) with keyword overrides (a key's
    last part, `num_epochs=2`, an alias, `learning_rate=1e-4`, or a dotted key, `**{"training.seed": 1}`).
    `resume="auto"` continues the run in output_dir; `overwrite=True` replaces it."""
    with _as_api():
        cfg = _config(config, overrides)
        require_training_data(cfg)
        summary = run_training(cfg, resume=resume, overwrite=overwrite)
    run_dir = Path(cfg.output_dir)
    best = run_dir / "best"
    return TrainResult(run_dir=run_dir, best_checkpoint=best if best.is_dir() else None, metrics=summary)


def evaluate(checkpoint: str | Path, **options: Any) -> dict[str, Any]:
    """Metrics of an export (a run's best/) as `fulltune evaluate` computes and writes them; `options` are that
    command's: data_dir, split, file, dataset_name, output_dir, batch_size, block_size, stride, device."""
    with _as_api():
        return evaluate_checkpoint(checkpoint, **options)


def predict(
    checkpoint: str | Path,
    inputs: str | Path | list[Any],
    *,
    top_k: int = 5,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str = "auto",
) -> Any:
    """What `fulltune predict` prints, as values: for a classifier, {"input", "top_k": [{"label", "probability"}]}
    per text (or image path; a folder of images is every image in it); for a causal LM, {"prompt", "generated"} per
    prompt; for a tagger, {"input", "words", "tags", "entities"} per sentence (a text split on whitespace); for a
    regression, {"input", "prediction"} (a number). A sentence pair is a (first, second) tuple. One input gives one
    row, a list a list of rows."""
    with _as_api():
        bundle = load_exported(checkpoint, resolve_device(device))
        many = isinstance(inputs, list) or (bundle.task == "image_classification" and Path(inputs).is_dir())
        items = list(inputs) if isinstance(inputs, list) else [inputs]
        if bundle.task == "causal_lm":
            rows = [
                {"prompt": p, "generated": generate(bundle, str(p), max_new_tokens, temperature, top_p)} for p in items
            ]
        elif bundle.task == "multi_label_classification":  # {"input", "labels": every label above its threshold}
            rows = multi_label_rows(bundle, [str(item) for item in items])
        elif bundle.task == "token_classification":  # a text split on whitespace, or a list of words
            sentences = [item.split() if isinstance(item, str) else [str(w) for w in item] for item in items]
            rows = [tagged_row(w, t) for w, t in zip(sentences, tag_sentences(bundle, sentences), strict=True)]
        else:
            if bundle.task == "image_classification":
                items = [path for item in items for path in image_paths(str(item))]
            if bundle.task == "text_regression":  # a number per text (or (first, second) sentence pair)
                values = regress(bundle, items)
                rows = [{"input": x, "prediction": v} for x, v in zip(items, values, strict=True)]
                return rows if many else rows[0]
            tops = classify(bundle, items, top_k)
            rows = [
                {"input": str(item), "top_k": [{"label": label, "probability": p} for label, p in top or []]}
                for item, top in zip(items, tops, strict=True)
            ]
    return rows if many else rows[0]
