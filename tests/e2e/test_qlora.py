"""method.name=qlora: a 4-bit NF4 base (bitsandbytes) with LoRA adapters on CUDA; one error line elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA, base_overrides

from fulltune import cli
from fulltune.config import load_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error line; CUDA runs the real thing below")
def test_qlora_without_cuda_is_one_error_line(tmp_path, capsys):
    corpus = tmp_path / "train.txt"
    corpus.write_text("a line of text to train on\n" * 50)
    code = cli.main(
        [
            "train",
            "--task",
            "causal_lm",
            "--train_file",
            str(corpus),
            "--output_dir",
            str(tmp_path / "r"),
            "--method",
            "qlora",
            "model.tiny_config=" + repr(TINY_LLAMA).replace("'", '"'),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith(
        "fulltune: error: method.name=qlora loads the base model in 4-bit NF4 with bitsandbytes, which needs CUDA"
    )


@pytest.mark.gpu
def test_qlora_trains_lora_on_a_4bit_base(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs CUDA")
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fulltune.model.bundle import packaged_minilm_path
    from fulltune.training.trainer import setup, train

    base = tmp_path / "base"
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=30522,
    )
    LlamaForCausalLM(config).save_pretrained(base)
    corpus = tmp_path / "train.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    values = base_overrides(
        tmp_path / "run",
        TINY_LLAMA,
        task="causal_lm",
        method__name="qlora",
        data__train_file=str(corpus),
        data__seq_len=64,
        data__batch_size=4,
        training__max_steps=3,
        training__base_learning_rate=1e-3,
    )
    values.update(
        {
            "model.tiny_config": None,
            "model.name_or_path": str(base),
            "hardware.mixed_precision": "bf16",
            "model.tokenizer": str(packaged_minilm_path()),
        }
    )
    cfg = load_config(None, values)
    run = setup(cfg)
    linear4 = [m for m in run.model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "the base is not 4-bit"
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = train(cfg)
    assert summary["optimizer_steps"] == 3
