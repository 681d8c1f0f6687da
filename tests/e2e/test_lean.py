"""`training.memory: lean` in the trainer: the fused step is attached, a lean run tracks the fp32 run, resume
mid-epoch is bit-identical (BF16AdamW, 8- and 4-bit moments on a tiny Llama), accumulation steps after backward,
and the CUDA-only options are config errors on a CPU."""

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


# A 64-wide Llama whose embeddings, head, q/o and MLP matrices (4096+ elements) get quantized moments, k/v (2048)
# plain ones; a 300-token BPE vocabulary (the model's 512 rows: a multiple of the block size)
LOWBIT_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 512}


# tied: input and output embeddings share one weight, which the fused step updates in vocabulary chunks during
# backward (a row of `hidden` elements: whole blocks of 8-bit (256) or 4-bit (128) moments)
@pytest.mark.parametrize(
    ("optimizer", "hidden", "tied"),
    [("adamw8bit", 64, False), ("adamw4bit", 128, True), ("adamw8bit", 256, True), ("bf16_adamw", 64, True)],
)
def test_lowbit_resume_mid_epoch_is_bit_identical(tmp_path, optimizer, hidden, tied) -> None:
    import json
    import shutil

    from conftest import TINY_LLAMA
    from test_causal_lm import lm_cfg, make_bpe_tokenizer, write_corpus
    from test_train import assert_same_weights

    from fulltune.training.lowbit import LowBitAdamW
    from fulltune.training.trainer import setup, train

    if optimizer != "bf16_adamw":
        pytest.importorskip("torchao")
    corpus = write_corpus(tmp_path / "train.txt", 60, 0)
    tokenizer = make_bpe_tokenizer(corpus.read_text(), tmp_path / "tokenizer")

    def make(out):
        return lm_cfg(
            out,
            TINY_LLAMA | LOWBIT_LLAMA | {"hidden_size": hidden, "tie_word_embeddings": tied},
            corpus,
            data__max_samples=16,
            model__tokenizer=str(tokenizer),
            training__memory="lean",
            training__lean_optimizer=optimizer,
            training__max_grad_norm=None if tied else 1.0,  # clipping by a whole tensor's norm holds its gradient
            training__num_epochs=2,
            checkpoint__save_every_steps=3,
            checkpoint__keep_last=0,
            checkpoint__save_best=False,
        )

    run = setup(make(tmp_path / "probe"))
    assert run.fused is not None and isinstance(run.optimizer, BF16AdamW if optimizer == "bf16_adamw" else LowBitAdamW)
    assert (run.fused.tied is not None) == tied, run.fused.tied_note
    train(make(tmp_path / "full"))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full/checkpoint-step-3", tmp_path / "resumed/checkpoint-step-3")
    state = json.loads((tmp_path / "resumed/checkpoint-step-3/training_state/trainer_state.json").read_text())
    assert state["epoch"] == 0 and 0 < state["batches_done"] < 4  # 16 blocks / 4 per batch: step 3 is mid-epoch
    train(make(tmp_path / "resumed"), resume="auto")
    assert_same_weights(tmp_path / "full/checkpoint-epoch-2", tmp_path / "resumed/checkpoint-epoch-2")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"training__lean_optimizer": "paged_adamw8bit"}, "paged_adamw8bit needs a CUDA device"),
        ({"training__lean_offload": True}, "lean_offload=true moves optimizer state from a CUDA device"),
        ({"training__lean_optimizer": "adamw4bit", "training__lean_rounding": "kahan"}, "set training.lean_rounding"),
    ],
)
def test_lowbit_options_that_need_cuda_or_do_not_fit_are_config_errors(tmp_path, text_data, extra, message) -> None:
    from fulltune.config import ConfigError
    from fulltune.training.trainer import setup

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(ConfigError, match=message):
        setup(_lean_cfg(tmp_path / "run", text_data, training__memory="lean", **extra))
