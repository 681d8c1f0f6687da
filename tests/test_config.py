"""Config loading: shipped example configs parse, seed-document keys and aliases load, overrides and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fulltune.config import ConfigError, config_from_dict, load_config, to_dict

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
    cfg = load_config(None, ["training.learning_rate=2e-5", "training.fp16=true", "model.name=foo/bar",
                             "data.batch_size=8", "method.freeze=embeddings,encoder.layer.0"])
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
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config(None, [override])
