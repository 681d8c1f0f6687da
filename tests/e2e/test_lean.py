"""`training.memory: lean` in the trainer: the fused step is attached, a lean run tracks the fp32 run, resume
mid-epoch is bit-identical, accumulation steps after backward, and adamw8bit without CUDA is a config error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_text_config

from fulltune.training.lean import BF16AdamW


def _lean_cfg(out, text_data, **extra):
    return tiny_bert_text_config(
        out, text_data, **({"data__batch_size": 4, "model__dropout": 0.0, "training__num_epochs": 2} | extra)
    )


def test_lean_training_fuses_the_step_and_tracks_standard_mode(tmp_path, text_data) -> None:
    from test_train import weights

    from fulltune.training.trainer import setup, train

    run = setup(_lean_cfg(tmp_path / "probe", text_data, training__memory="lean"))
    assert run.fused is not None and run.model.dtype == torch.bfloat16
    lean = train(_lean_cfg(tmp_path / "lean", text_data, training__memory="lean"))
    std = train(_lean_cfg(tmp_path / "std", text_data))
    assert lean["optimizer_steps"] == std["optimizer_steps"] == 16
    # same steps, same data order: the lean weights stay within bf16 noise of the fp32 run
    wl, ws = weights(tmp_path / "lean/checkpoint-epoch-2"), weights(tmp_path / "std/checkpoint-epoch-2")
    assert all(wl[k].dtype == torch.bfloat16 for k in wl if wl[k].is_floating_point())
    for k in ws:
        if ws[k].is_floating_point():
            torch.testing.assert_close(wl[k].float(), ws[k], atol=2e-2, rtol=2e-2, msg=k)


def test_lean_resume_mid_epoch_is_bit_identical(tmp_path, text_data) -> None:
    import json
    import shutil

    from test_train import assert_same_weights

    from fulltune.training.trainer import train

    def make(out):
        return _lean_cfg(
            out, text_data, training__memory="lean", checkpoint__save_every_steps=3, checkpoint__keep_last=0
        )

    train(make(tmp_path / "full"))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full/checkpoint-step-3", tmp_path / "resumed/checkpoint-step-3")
    state = json.loads((tmp_path / "resumed/checkpoint-step-3/training_state/trainer_state.json").read_text())
    assert 0 < state["batches_done"] < 8
    train(make(tmp_path / "resumed"), resume="auto")
    assert_same_weights(tmp_path / "full/checkpoint-epoch-2", tmp_path / "resumed/checkpoint-epoch-2")


def test_lean_with_accumulation_steps_after_backward(tmp_path, text_data) -> None:
    from fulltune.training.trainer import setup

    run = setup(
        _lean_cfg(tmp_path / "acc", text_data, training__memory="lean", training__gradient_accumulation_steps=2)
    )
    assert run.fused is None and isinstance(run.optimizer, BF16AdamW)


def test_adamw8bit_without_cuda_is_a_config_error(tmp_path, text_data) -> None:
    from fulltune.config import ConfigError
    from fulltune.training.trainer import setup

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(ConfigError, match="lean_optimizer=adamw8bit.*CUDA"):
        setup(_lean_cfg(tmp_path / "bnb", text_data, training__memory="lean", training__lean_optimizer="adamw8bit"))
