"""Every YAML snippet of the seed documents loads as written and runs a training step (issue 13, acceptance 1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP

from fulltune.config import load_config, names
from fulltune.model.trainable import param_groups, plan_trainable
from fulltune.training.trainer import setup, train

SEEDS = Path(__file__).parents[1] / "fixtures" / "seeds"
# CLIP with 12 vision blocks, as the seeds' ViT-B/32, so that `vision_model.encoder.layers.11` exists.
CLIP12 = {
    **TINY_CLIP,
    "vision_config": {
        **TINY_CLIP["vision_config"],
        "num_hidden_layers": 12,
        "hidden_size": 16,
        "intermediate_size": 32,
    },
}


def _overrides(out: Path, data: Path) -> dict:
    return {
        "output_dir": str(out),
        "model.tiny_config": CLIP12,
        "data.data_dir": str(data),
        "training.max_steps": 1,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "checkpoint.save_every_epochs": 0,
        "data.num_workers": 0,
        "training.seed": 0,
    }


@pytest.mark.parametrize("fixture", sorted(p.name for p in SEEDS.glob("*.yaml")))
def test_seed_snippet_loads_and_trains_one_step(tmp_path, image_data, fixture):
    cfg = load_config(SEEDS / fixture, _overrides(tmp_path / "run", image_data))
    summary = train(cfg)
    assert summary["optimizer_steps"] == 1
    assert (tmp_path / "run" / "train.log").read_text().count("parameters that train") == 1


def test_seed_layouts_map_onto_fulltune_keys(capsys):
    names._SAID.clear()  # each mapping is said once per process; earlier tests may have said it
    cfg = load_config(SEEDS / "000_layerwise_lr.yaml")
    assert cfg.training.layerwise_lr.enabled and cfg.training.layerwise_lr.decay_rate == 0.95
    cfg = load_config(SEEDS / "000_progressive_unfreezing.yaml")
    pu = cfg.training.progressive_unfreezing
    assert not pu.enabled and [s.epoch for s in pu.unfreeze_schedule] == [0, 2, 6]
    cfg = load_config(SEEDS / "000_config_vs_lora.yaml")
    assert (
        cfg.data.batch_size,
        cfg.training.base_learning_rate,
        cfg.training.num_epochs,
        cfg.training.gradient_accumulation_steps,
    ) == (16, 1e-5, 20, 2)
    cfg = load_config(SEEDS / "002_advice_table.yaml")
    t = cfg.training
    assert (cfg.data.batch_size, t.base_learning_rate, t.gradient_accumulation_steps, t.num_epochs) == (16, 1e-5, 2, 20)
    assert (t.max_grad_norm, t.warmup_ratio, t.weight_decay) == (0.5, 0.2, 0.05)
    assert t.early_stopping.enabled and t.early_stopping.patience == 3
    cfg = load_config(SEEDS / "002_advice_training.yaml")
    assert cfg.training.early_stopping.enabled and cfg.training.gradient_accumulation_steps == 2
    err = capsys.readouterr().err
    layout = "read as the layout of a CLIP fine-tuning config.yaml: "
    assert layout + "layerwise_lr -> training.layerwise_lr" in err
    assert layout + "progressive_unfreezing -> training.progressive_unfreezing" in err
    assert layout + "gradient_accumulation -> training.gradient_accumulation_steps" in err
    assert "seed" not in err
    assert "turns early stopping on" in err
    # once per process: loading again logs nothing new
    load_config(SEEDS / "000_layerwise_lr.yaml")
    assert "layerwise_lr" not in capsys.readouterr().err


def test_explicit_enabled_false_keeps_early_stopping_off():
    cfg = load_config(None, {"training.early_stopping": {"enabled": False, "patience": 4}})
    assert not cfg.training.early_stopping.enabled


def test_mixed_precision_true_means_the_seeds_amp(tmp_path, image_data):
    from fulltune.runtime.device import resolve_precision

    cfg = load_config(SEEDS / "002_oom_mixed_precision.yaml")
    assert cfg.hardware.mixed_precision == "amp"
    p = resolve_precision("amp", torch.device("cpu"))
    assert p.dtype == torch.bfloat16 and not p.needs_scaler and "fp16" in p.note
    if torch.cuda.is_available():
        p = resolve_precision("amp", torch.device("cuda"))
        assert p.dtype == torch.float16 and p.needs_scaler
    cfg = load_config(SEEDS / "002_oom_mixed_precision.yaml", _overrides(tmp_path / "run", image_data))
    train(cfg)
    assert "mixed_precision: true means fp16 as in torch.cuda.amp" in (tmp_path / "run" / "train.log").read_text()


def test_enabled_alone_uses_the_automatic_schedule(tmp_path, image_data):
    cfg = load_config(SEEDS / "002_oom_progressive_unfreezing.yaml", _overrides(tmp_path / "run", image_data))
    run = setup(cfg)
    at0 = run.plan.trainable_at(0)
    assert at0 == run.plan.lmap.head
    assert any("encoder.layers.11." in n for n in run.plan.trainable_at(1))
    assert not any("encoder.layers.10." in n for n in run.plan.trainable_at(1))


def test_proportional_unfreezing_follows_seed_001(tmp_path, image_data):
    cfg = load_config(
        SEEDS / "001_proportional_unfreezing.yaml",
        {**_overrides(tmp_path / "run", image_data), "training.num_epochs": 4},
    )
    run = setup(cfg)
    lmap = run.plan.lmap
    for epoch in range(4):
        k = int(epoch / 4 * 12)  # the seed's formula
        blocks = {lmap.layer_of[n] for n in run.plan.trainable_at(epoch) if 1 <= lmap.layer_of[n] <= 12}
        assert blocks == set(range(13 - k, 13)), epoch
        assert lmap.head <= run.plan.trainable_at(epoch)


def test_discriminative_layer_group_rates(tmp_path, image_data):
    cfg = load_config(SEEDS / "001_discriminative_lr.yaml", _overrides(tmp_path / "run", image_data))
    run = setup(cfg)
    lmap = run.plan.lmap
    base = cfg.training.base_learning_rate
    rate = {n: base * g["lr_scale"] for g in param_groups(run.model, run.plan, cfg) for n in g["names"]}
    for name, lr in rate.items():
        layer = lmap.layer_of[name]
        want = 1e-4 if name in lmap.head else 1e-6 if layer <= 4 else 5e-6 if layer <= 8 else 1e-5
        assert lr == pytest.approx(want), name
    ranges = load_config(
        None,
        {
            **_overrides(tmp_path / "r2", image_data),
            "training.layer_groups_lr": {"embeddings": 1e-7, "0-5": 2e-6, "6-11": 3e-6},
        },
    )
    groups = param_groups(run.model, plan_trainable(run.model, ranges), ranges)
    rate = {n: ranges.training.base_learning_rate * g["lr_scale"] for g in groups for n in g["names"]}
    assert all(rate[n] == pytest.approx(1e-7) for n in rate if lmap.layer_of[n] == 0)
    assert all(rate[n] == pytest.approx(2e-6) for n in rate if 1 <= lmap.layer_of[n] <= 6)
    assert all(rate[n] == pytest.approx(3e-6) for n in rate if 7 <= lmap.layer_of[n] <= 12)
    assert all(rate[n] == pytest.approx(ranges.training.base_learning_rate) for n in lmap.head)


def test_bad_layer_group_is_one_line(tmp_path, image_data):
    from fulltune.config import ConfigError

    cfg = load_config(None, {**_overrides(tmp_path / "run", image_data), "training.layer_groups_lr": {"12-13": 1e-5}})
    with pytest.raises(ConfigError, match=r"layer_groups_lr.12-13: blocks are numbered 0..11"):
        setup(cfg)


CLIP_FULL = Path(__file__).parents[2] / "configs" / "clip_full.yaml"


def test_clip_full_is_the_seeds_default_job(tmp_path, image_data):
    cfg = load_config(CLIP_FULL)
    assert (cfg.data.data_dir, cfg.output_dir, cfg.logging.log_dir) == (
        "data/dogs",
        "outputs/full_finetuning",
        "logs/full_finetuning",
    )
    t = cfg.training
    assert (cfg.data.batch_size, t.base_learning_rate, t.num_epochs, t.gradient_accumulation_steps) == (16, 1e-5, 20, 2)
    assert t.layerwise_lr.enabled and t.layerwise_lr.decay_rate == 0.95 and cfg.hardware.mixed_precision == "amp"
    run_cfg = load_config(
        CLIP_FULL, {**_overrides(tmp_path / "run", image_data), "data.num_workers": 0, "logging.log_dir": None}
    )
    assert train(run_cfg)["optimizer_steps"] == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"\[train\] step 1 epoch \d: accuracy", log)  # training accuracy, from the step's own logits
