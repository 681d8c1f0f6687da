"""Config loading: shipped example configs parse, seed-document keys and aliases load, overrides and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest

from fulltune.config import _coerce, config_from_dict, load_config, to_dict
from fulltune.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_seed_document_layout_loads(tmp_path):
    seed = tmp_path / "config.yaml"
    seed.write_text(
        """
data:
  batch_size: 16
training:
  base_learning_rate: 1e-5
  num_epochs: 20
  gradient_accumulation_steps: 2
  layerwise_lr:
    enabled: true
    decay_rate: 0.95
  progressive_unfreezing:
    enabled: false
    unfreeze_schedule:
      - epoch: 0
        layers: ["classifier"]
      - epoch: 2
        layers: ["vision_model.encoder.layers.11"]
      - epoch: 6
        layers: ["all"]
  max_grad_norm: 0.5
  patience: 3
hardware:
  mixed_precision: true
"""
    )
    cfg = load_config(seed)
    assert cfg.training.base_learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string: coerced
    assert cfg.training.layerwise_lr.decay_rate == 0.95
    assert cfg.training.progressive_unfreezing.unfreeze_schedule[1].layers == ["vision_model.encoder.layers.11"]
    assert cfg.training.early_stopping.patience == 3
    assert cfg.hardware.mixed_precision == "amp"  # the seeds: fp16 + GradScaler on CUDA, bf16 elsewhere


def test_overrides_and_aliases():
    cfg = load_config(
        None,
        [
            "training.learning_rate=2e-5",
            "training.fp16=true",
            "model.name=foo/bar",
            "data.batch_size=8",
            "method.freeze=embeddings,encoder.layer.0",
        ],
    )
    assert cfg.training.base_learning_rate == 2e-5
    assert cfg.hardware.mixed_precision == "fp16"
    assert cfg.model.name_or_path == "foo/bar"
    assert cfg.method.freeze == ["embeddings", "encoder.layer.0"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("training.lr_schedular=cosine", "did you mean 'lr_scheduler'"),
        ("training.lr_scheduler=exponential", "expected one of 'cosine', 'linear', 'constant'"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("hardware.mixed_precision=fp8", "hardware.mixed_precision"),
        ("nonsense", "expected key=value"),
        ("training.layerwise_lr=5", "expected a mapping"),
        ("training.base_learning_rate=inf", "base_learning_rate must be a finite number"),
        ('training.layer_groups_lr={"head": .nan}', "layer_groups_lr.head must be a finite number"),
        ("hardware.num_threads=100000", "hardware.num_threads"),
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config(None, [override])


# ------------------------------------------------------------------------------------------------ the coercer


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("1e-5", float, 1e-5),
        (3, float, 3.0),
        (4.0, int, 4),
        ("12", int, 12),
        ("yes", bool, True),
        ("0", bool, False),
        (7, str, "7"),
        (None, int | None, None),
        ("2", int | None, 2),
        ("a,b", list[str], ["a", "b"]),
        ([0.5, 1], tuple[float, float], (0.5, 1.0)),
        (True, Literal["auto", "bf16", "no"], "auto"),
        (False, Literal["auto", "bf16", "no"], "no"),
        ({"x": 1}, dict[str, Any], {"x": 1}),
    ],
)
def test_coerce_accepts_what_yaml_gives(value, tp, expected):
    assert _coerce(value, tp, "k") == expected


@pytest.mark.parametrize(
    ("value", "tp", "message"),
    [
        (True, int, "expected an integer"),
        (2.5, int, "expected an integer"),
        ("fast", float, "expected a number"),
        ("maybe", bool, "true or false"),
        ([1], str, "expected a string"),
        ([1, 2, 3], tuple[float, float], "2 values"),
        ("fp8", Literal["bf16", "no"], "one of"),
        (5, list[int], "expected a list"),
        ("x", int | None, "int | None"),
    ],
)
def test_coerce_rejects_with_the_key_and_what_was_expected(value, tp, message):
    with pytest.raises(ConfigError, match=f"config key 'section.key'.*{message}"):
        _coerce(value, tp, "section.key")
