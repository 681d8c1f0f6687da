"""Saving a pruned model as a folder that says how to load it (the format and loader: `fulltune.model.pruned`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fulltune.model.pruned import export_note, record_layer_shapes, standard_config
from fulltune.model.pruning import (
    REPORT_FILE,
)
from fulltune.state.modelcard import pruned_meta, write_model_card


def save_pruned(model: nn.Module, tokenizer: Any | None, out_dir: str | Path, report: dict | None = None) -> Path:
    """Write a ``save_pretrained`` folder (safetensors) and a README.md saying how to load it.

    Where every layer kept one shape, config.json is a standard config that plain ``from_pretrained`` loads (a Llama
    whose head count LlamaConfig refuses is written as Mistral's config: `fulltune.model.pruned.standard_config`);
    where layers differ, it records the per-layer shapes (plain ``from_pretrained`` fails with size mismatches: use
    `load_pruned`). ``report`` (from `prune_model`), if given, is written next to it as fulltune_prune_report.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, note = standard_config(model)
    if config is None:
        record_layer_shapes(model, note)
        note = export_note(model.config)["loading"]
    model.save_pretrained(out)
    if config is not None:  # the weights' names are the same under the standard config: only config.json changes
        config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    base = getattr(model.config, "_name_or_path", "") or "?"
    meta = pruned_meta(base, report, sum(p.numel() for p in model.parameters()))
    write_model_card(out, meta | {"notes": [*(meta.get("notes") or []), note]})  # the card says how to load it
    return out
