"""The CLIP zero-shot model evaluated as it is, without training (compare's `zero_shot` row); its head is built
by `fulltune.model.clip`."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, ConfigError, save_config
from fulltune.data import images as img
from fulltune.data.text import run_inputs
from fulltune.eval.evaluate import classification_metrics
from fulltune.files.rundir import atomic_dir, claim_output_dir, release_run_lock
from fulltune.model.build import build_model
from fulltune.model.bundle import count_parameters
from fulltune.runtime.device import resolve_device, resolve_precision
from fulltune.runtime.memory import peak_memory_bytes
from fulltune.runtime.rng import seed_everything
from fulltune.state import checkpoint as ckpt
from fulltune.training.tasks import TASKS, infer_task, read_labels

# ------------------------------------------------------------------------------------------ the zero-shot model


def evaluate_model(model: nn.Module, dataset: Any, cfg: Config, num_classes: int) -> dict[str, Any]:
    """Classification metrics of `model` on an image dataset (scalars only)."""

    device = resolve_device(cfg.hardware.device)
    model.to(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.data.eval_batch_size or 2 * cfg.data.batch_size,
        collate_fn=img.collate_images,
        num_workers=0,
    )
    metrics = classification_metrics(
        model, loader, num_classes, device, resolve_precision(cfg.hardware.mixed_precision, device)
    )
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def zero_shot_run(cfg: Config) -> dict[str, Any]:
    """Build the zero-shot classifier (no training), evaluate it on val and test, export it to <output_dir>/best and
    write config.yaml and summary.json like a training run (what compare's `zero_shot` row reads)."""

    start = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.method.head_init = "zeroshot"
    out = Path(cfg.output_dir)
    claim_output_dir(out, None, inputs=run_inputs(cfg))  # written like a training run's folder
    seed_everything(cfg.training.seed)
    task = infer_task(cfg)
    if task != "image_classification":
        raise ConfigError(f"the zero-shot model is a CLIP image classifier; this data is {task}")
    labels, raw = read_labels(cfg, task)
    bundle = build_model(cfg, task, labels)
    data = TASKS[task].build_data(cfg, bundle, labels, raw)
    _, total = count_parameters(bundle.model)
    summary: dict[str, Any] = {
        "task": task,
        "method": "zero_shot",
        "optimizer_steps": 0,
        "epochs_done": 0,
        "trainable_parameters": 0,
        "total_parameters": total,
    }
    val = evaluate_model(bundle.model, data.val, cfg, len(labels)) if data.val is not None else None
    summary["best_val"] = {"accuracy": val["accuracy"] if val else None, "step": 0}
    if data.test is not None:
        summary["test"] = evaluate_model(bundle.model, data.test, cfg, len(labels)) | {"weights": "best"}
    meta = ckpt.run_meta(
        task,
        labels,
        cfg,
        {
            "optimizer_step": 0,
            "epoch": 0,
            "trainable_parameters": 0,
            "total_parameters": total,
            "val_metrics": val,
            "class_names": bundle.extra["class_names"],
        },
    )
    with atomic_dir(out / "best") as tmp:
        ckpt.export_model(bundle.model, bundle, tmp, meta)
        save_config(cfg, tmp / "config.yaml")
    save_config(cfg, out / "config.yaml")
    (out / "labels.json").write_text(json.dumps(labels))
    summary.update(
        {
            "peak_memory_bytes": peak_memory_bytes(resolve_device(cfg.hardware.device)),
            "output_dir": str(out),
            "last_checkpoint": str(out / "best"),
            "wall_time_s": time.perf_counter() - start,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    release_run_lock(out)
    return summary
