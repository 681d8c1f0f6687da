"""`fulltune compare` with method variants, the untrained-head row and a top-5 column (issue 13)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import parse_cli
from test_compare import write_compare_config

from fulltune.compare.runner import learning_rates, parse_methods
from fulltune.compare.table import markdown
from fulltune.compare.variants import UNTRAINED, parse_variants
from fulltune.config import ConfigError


def test_variants_parse_to_methods_overrides_and_folders():
    vs = parse_variants("full,lora:r=8,lora:r=16,qlora,partial:trainable_layers=4")
    assert [(v.method, v.label) for v in vs] == [
        ("full", "full"),
        ("lora", "lora-r8"),
        ("lora", "lora-r16"),
        ("qlora", "qlora"),
        ("partial", "partial-trainable_layers4"),
    ]
    assert vs[2].overrides == ("method.lora.r=16",) and vs[4].overrides == ("method.trainable_layers=4",)
    assert parse_methods("lora:r=8, full,lora:r=8") == ["lora:r=8", "full"]
    with pytest.raises(ConfigError, match="unknown method 'adapter'"):
        parse_methods("adapter:r=2")
    with pytest.raises(ConfigError, match="METHOD:key=value"):
        parse_methods("lora:r")
    lrs = learning_rates("lora-r16=1e-3", ["full", "lora:r=8", "lora:r=16", "qlora"], 1e-5)
    assert lrs == pytest.approx({"full": 1e-5, "lora:r=8": 1e-4, "lora:r=16": 1e-3, "qlora": 1e-4})


def test_top5_column_only_with_more_than_five_classes():
    row = {
        "method": "full",
        "learning_rate": 1e-5,
        "status": "ok",
        "metric": "accuracy",
        "val": 0.5,
        "test": 0.4,
        "test_top5": 0.9,
        "trainable_parameters": 10,
        "trainable_percent": 100.0,
        "peak_memory_bytes": 1,
        "wall_time_s": 1.0,
        "samples_per_s": 1.0,
        "exported_bytes": 1,
        "adapter_bytes": None,
    }
    settings = {
        "model": "m",
        "data": "d",
        "budget": "1 epoch",
        "global_batch": 8,
        "length": "x",
        "seed": 0,
        "precision": "fp32",
        "device": "cpu",
    }
    assert "top-5" not in markdown([row], settings | {"num_classes": 5})
    table = markdown([row], settings | {"num_classes": 12})
    assert "| test top-5 |" in table and "| 0.4000 | 0.9000 |" in table


def test_compare_runs_variants_and_the_untrained_row(tmp_path, text_data):
    config = write_compare_config(tmp_path, checkpoint={"save_best": False})
    out = tmp_path / "cmp"
    args = parse_cli(
        "compare",
        "--config",
        str(config),
        "--data_dir",
        str(text_data),
        "--output_dir",
        str(out),
        "--methods",
        "lora:r=2",
    )  # one child process: start-up dominates
    assert args.func(args) == 0
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in report["runs"]}
    assert list(rows) == [UNTRAINED, "lora-r2"]
    assert rows[UNTRAINED]["trainable_parameters"] == 0 and 0.0 <= rows[UNTRAINED]["val"] <= 1.0
    assert rows["lora-r2"]["status"] == "ok" and (out / "lora-r2" / "summary.json").is_file()
    assert yaml.safe_load((out / "lora-r2" / "config.yaml").read_text())["method"]["lora"]["r"] == 2
    assert "| untrained head |" in (out / "comparison.md").read_text()
