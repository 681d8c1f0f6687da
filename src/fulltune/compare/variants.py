"""What `fulltune compare` compares beyond one run per method: method variants such as `lora:r=8` and `lora:r=16`
(each its own run folder, lora-r8), and the row the guides' comparison tables start from: the model evaluated with its
fresh, untrained head (a pretrained causal LM as it is), no training.

A variant is `METHOD[:key=value[;key=value...]]`. Keys are config keys under the method's section: r, alpha, dropout,
target_modules for lora/qlora (method.lora.*), trainable_layers for partial (method.*); a dotted key is used as is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune.config import Config, ConfigError
from fulltune.config.methods import VARIANT_METHODS
from fulltune.eval.metrics import scalar_metrics
from fulltune.training.tasks import validation_metric
from fulltune.training.trainer import setup

UNTRAINED = "untrained head"


@dataclass(frozen=True)
class Variant:
    spec: str
    """As typed: lora:r=8."""
    method: str
    """method.name: lora."""
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """key=value overrides: method.lora.r=8."""
    label: str = ""
    """Row label and run folder name: lora-r8."""


def _key(method: str, key: str) -> str:
    if "." in key:
        return key
    return f"method.lora.{key}" if method in ("lora", "qlora") else f"method.{key}"


def variant(spec: str) -> Variant:
    """`lora:r=16;alpha=32` -> Variant(method lora, overrides method.lora.r=16 / .alpha=32, label lora-r16-alpha32)."""
    method, _, options = spec.partition(":")
    method = method.strip()
    if method not in VARIANT_METHODS:
        raise ConfigError(
            f"--methods: unknown method '{method}' in '{spec}'; choose from {', '.join(VARIANT_METHODS)}"
            " (variants: lora:r=16, partial:trainable_layers=4, ...)"
        )
    overrides, parts = [], [method]
    for item in filter(None, (o.strip() for o in options.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--methods '{spec}': expected METHOD:key=value[;key=value], e.g. lora:r=16")
        overrides.append(f"{_key(method, key.strip())}={value.strip()}")
        short = key.strip().rsplit(".", 1)[-1]
        parts.append(f"{short}{value.strip()}" if short in ("r",) else f"{short}{value.strip()}".replace("/", "_"))
    return Variant(spec=spec.strip(), method=method, overrides=tuple(overrides), label="-".join(parts))


def parse_variants(text: str) -> list[Variant]:
    """`full,lora:r=8,lora:r=16,qlora` -> one Variant each, in order, duplicates dropped; labels must differ."""
    specs = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not specs:
        raise ConfigError(f"--methods '{text}': unknown (none given); choose from {', '.join(VARIANT_METHODS)}")
    variants = [variant(s) for s in specs]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods '{text}': two variants share the run folder name ({', '.join(labels)})")
    return variants


def untrained_lm_label(cfg: Config) -> str:
    """A causal LM's row before training: its pretrained weights, or a random init (model.tiny_config)."""
    return "random init (no training)" if cfg.model.tiny_config else "pretrained (no training)"


def untrained_row(cfg: Config) -> dict[str, Any]:
    """The model as it starts a run (pretrained weights, a fresh head seeded like the runs'), evaluated on the
    validation and test splits without any training step: the guides' "pretrained / zero-shot" baseline row."""

    tic = time.perf_counter()
    run = setup(cfg)
    metric, _ = validation_metric(run.cfg, run.task)
    val = scalar_metrics(run.evaluate_split(run.data.val)) if run.data.val is not None else {}
    test = scalar_metrics(run.evaluate_split(run.data.test)) if run.data.test is not None else {}
    total = sum(p.numel() for p in run.model.parameters())
    label = UNTRAINED if run.task_name != "causal_lm" else untrained_lm_label(cfg)
    return {
        "method": label,
        "learning_rate": 0.0,
        "run_dir": cfg.output_dir,
        "status": "ok",
        "error": None,
        "peak_rss_bytes": None,
        "metric": metric,
        "val": val.get(metric),
        "test": test.get(metric),
        "test_top5": test.get("top5_accuracy"),
        "test_examples": test.get("examples"),
        "test_weights": "untrained",
        "trainable_parameters": 0,
        "total_parameters": total,
        "trainable_percent": 0.0,
        "peak_memory_bytes": None,
        "wall_time_s": time.perf_counter() - tic,
        "samples_per_s": None,
        "optimizer_steps": 0,
        "export_dir": None,
        "exported_bytes": None,
        "adapter_bytes": None,
        "num_classes": len(run.data.labels) if run.data.labels else None,
    }


def test_top5(run_dir: Path) -> float | None:
    """The run's test top-5 accuracy (summary.json), where it has one."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return (summary.get("test") or {}).get("top5_accuracy")


def num_classes(rows: list[dict[str, Any]]) -> int | None:
    """Classes of the compared task, from a run's labels.json (None for causal LMs)."""
    for r in rows:
        if r.get("num_classes"):
            return int(r["num_classes"])
        labels = Path(r.get("run_dir") or "") / "labels.json"
        if labels.is_file():
            values = json.loads(labels.read_text())
            return len(values) if values else None
    return None
