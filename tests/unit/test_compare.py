"""`fulltune compare` on a tiny BERT: one method runs in its own process, one fails, and both are reported."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml
from conftest import TINY_BERT, parse_cli

from fulltune.compare.runner import learning_rates, parse_methods
from fulltune.errors import ConfigError


def _parse(argv: list[str]) -> argparse.Namespace:
    return parse_cli("compare", *argv)


def write_compare_config(folder, **sections: dict) -> object:
    """config.yaml for compare runs on the tiny BERT: one epoch, fp32, quiet; `sections` are merged in."""
    values = {
        "model": {"tiny_config": TINY_BERT},
        "data": {"text_column": "sentence", "batch_size": 16},
        "training": {"num_epochs": 1, "seed": 0, "base_learning_rate": 1e-3},
        "hardware": {"mixed_precision": "no"},
        "logging": {"tensorboard": False, "log_every_steps": 1},
    }
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(values | sections))
    return config


def test_compare_reports_a_failing_method_and_runs_the_other(tmp_path, text_data):
    config = write_compare_config(tmp_path)
    out = tmp_path / "cmp"
    # LoRA aimed at a module the model does not have fails in its own process; the linear probe still runs.
    args = _parse(
        [
            "--config",
            str(config),
            "--data_dir",
            str(text_data),
            "--output_dir",
            str(out),
            "--methods",
            "linear_probe,lora",
            "--lr_per_method",
            "linear_probe=x3",
            "method.lora.target_modules=[no_such_module]",
        ]
    )
    assert args.func(args) == 1  # one method failed

    report = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in report["runs"]}
    probe, lora = rows["linear_probe"], rows["lora"]
    assert probe["status"] == "ok" and probe["learning_rate"] == pytest.approx(3e-3)
    assert 0.0 <= probe["val"] <= 1.0 and 0.0 <= probe["test"] <= 1.0
    assert probe["trainable_parameters"] == 32 * 2 + 2  # the head of a 32-wide model, two classes
    assert probe["peak_memory_bytes"] > 0 and probe["peak_rss_bytes"] > 0 and probe["exported_bytes"] > 0
    assert probe["adapter_bytes"] is None
    assert (out / "linear_probe" / "summary.json").is_file()  # a normal run folder
    assert (out / "linear_probe" / "config.yaml").is_file()
    assert lora["status"] == "failed" and "no_such_module" in lora["error"]

    table = (out / "comparison.md").read_text()
    assert "| linear_probe | 3e-3 |" in table and "| lora | 1e-2 | failed |" in table
    assert "no_such_module" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_and_learning_rate_parsing():
    assert parse_methods("lora, full,lora") == ["lora", "full"]
    with pytest.raises(ConfigError, match="choose from"):
        parse_methods("lora,adapter")
    lrs = learning_rates("lora=2e-4,linear_probe=x20", ["full", "partial", "lora", "linear_probe"], 1e-5)
    assert lrs == pytest.approx({"full": 1e-5, "partial": 1e-5, "lora": 2e-4, "linear_probe": 2e-4})
    with pytest.raises(ConfigError, match="method=LR"):
        learning_rates("lora=fast", ["lora"], 1e-5)
    with pytest.raises(ConfigError, match="unknown method"):
        learning_rates("prefix=1e-3", ["lora"], 1e-5)
