"""model.torch_dtype: what loads in bf16, and where standard mode keeps fp32 master weights (issue 13)."""

from __future__ import annotations

import torch
from conftest import TINY_BERT, base_overrides

from fulltune.config import load_config
from fulltune.training.trainer import setup


def _cfg(tmp_path, text_data, **extra):
    return load_config(
        None,
        base_overrides(
            tmp_path / "run",
            TINY_BERT,
            data__data_dir=str(text_data),
            data__text_column="sentence",
            model__torch_dtype="bfloat16",
            **extra,
        ),
    )


def test_full_keeps_fp32_master_weights(tmp_path, text_data):
    run = setup(_cfg(tmp_path, text_data))
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}


def test_lora_keeps_the_frozen_base_in_bf16(tmp_path, text_data):
    run = setup(_cfg(tmp_path, text_data, method__name="lora"))
    trains = {p.dtype for p in run.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert trains == {torch.float32} and frozen == {torch.bfloat16}


def test_lean_keeps_bf16(tmp_path, text_data):
    run = setup(_cfg(tmp_path, text_data, training__memory="lean"))
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
