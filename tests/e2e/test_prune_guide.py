"""The pruning guide's six `prune` command lines (seed 003), typed as written with only the model path changed to
a tiny Llama folder, run on fulltune's built-in text and write the guide's layout (issue 13, acceptance 2)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from test_causal_lm import make_bpe_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune import cli
from fulltune.data.docstrings import build_docstring_dataset
from fulltune.model.pruned import is_pruned_folder
from fulltune.prune import guide as prune_guide

# The six command lines of 003 as printed there (方案1, 方案2, 场景1-4); `python llama3_..._gqa_aware.py` becomes
# `fulltune prune`, and only --base_model's path changes.
GUIDE = r"""
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/Llama-3-8B-Instruct \
    --save_ckpt_log_name llama3_pruned_finetuned \
    --pruning_ratio 0.25 \
    --prune_mlp \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_method full \
    --finetune_lr 1e-5 \
    --finetune_epochs 2 \
    --finetune_samples 1000 \
    --finetune_batch_size 1 \
    --finetune_grad_accum 4 \
    --finetune_max_grad_norm 1.0 \
    --finetune_weight_decay 0.01 \
    --finetune_warmup_steps 50
---
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/Llama-3-8B-Instruct \
    --save_ckpt_log_name llama3_pruned_lora \
    --pruning_ratio 0.25 \
    --prune_mlp \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_method lora \
    --finetune_lr 2e-4 \
    --finetune_epochs 3 \
    --finetune_samples 1000 \
    --finetune_batch_size 1 \
    --finetune_grad_accum 8
---
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/model \
    --save_ckpt_log_name standard_finetune \
    --pruning_ratio 0.25 \
    --prune_mlp \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_method full \
    --finetune_lr 1e-5 \
    --finetune_epochs 2 \
    --finetune_samples 1000 \
    --finetune_grad_accum 4 \
    --finetune_warmup_steps 50
---
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/model \
    --save_ckpt_log_name aggressive_prune \
    --pruning_ratio 0.30 \
    --prune_mlp \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_method full \
    --finetune_lr 2e-5 \
    --finetune_epochs 3 \
    --finetune_samples 2000 \
    --finetune_grad_accum 8 \
    --finetune_warmup_steps 100 \
    --finetune_weight_decay 0.02
---
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/model \
    --save_ckpt_log_name lora_finetune \
    --pruning_ratio 0.25 \
    --prune_mlp \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_method lora \
    --finetune_lr 2e-4 \
    --finetune_epochs 3 \
    --finetune_samples 1500 \
    --finetune_grad_accum 8
---
python llama3_unbalanced_pruning_gqa_aware.py \
    --base_model /path/to/model \
    --save_ckpt_log_name quick_test \
    --pruning_ratio 0.25 \
    --importance_samples 20 \
    --layer_start 10 \
    --layer_end 15 \
    --save_model \
    --test_after_prune \
    --finetune \
    --finetune_samples 100 \
    --finetune_epochs 1 \
    --finetune_batch_size 1 \
    --finetune_grad_accum 2
"""
COMMANDS = [shlex.split(block.replace("\\\n", " ")) for block in GUIDE.strip().split("---")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 16-layer tiny Llama (场景4 prunes layers 10-14) with a BPE tokenizer of the built-in text's words."""
    root = tmp_path_factory.mktemp("guide")
    splits = build_docstring_dataset(root / "docstrings")
    text = "\n".join(json.loads(line)["text"] for line in splits["train"].read_text().splitlines()[:1500])
    folder = root / "tiny-llama"
    make_bpe_tokenizer(text, folder, vocab_size=2000)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2000,
        bos_token_id=0,
        eos_token_id=1,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_there_are_six_guide_commands():
    assert len(COMMANDS) == 6 and all(c[:2] == ["python", "llama3_unbalanced_pruning_gqa_aware.py"] for c in COMMANDS)


@pytest.mark.parametrize("index", range(6))
def test_guide_command_runs_as_written(tiny_llama, tmp_path, monkeypatch, index):
    argv = COMMANDS[index][2:]
    argv[argv.index("--base_model") + 1] = str(tiny_llama)
    name = argv[argv.index("--save_ckpt_log_name") + 1]
    monkeypatch.chdir(tmp_path)  # outputs/NAME is relative, as in the guide
    # Test speed only: a few blocks of the built-in text (the commands stay as written), one thread (a loaded CPU).
    monkeypatch.setattr(prune_guide, "BUILTIN_TRAIN_CHARS", 4000)
    monkeypatch.setattr(prune_guide, "BUILTIN_EVAL_CHARS", 2500)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["prune", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "outputs" / name
    log = (out / "logs" / "training.log").read_text(encoding="utf-8")
    # the lines the guide greps for: grep "剪枝后 PPL" logs/training.log
    for label in ("原始模型 PPL", "剪枝后 PPL", "微调后 PPL"):
        assert sum(line.startswith(label + ": ") for line in log.splitlines()) == 1, label
    assert "built-in English text" in log
    # every layer pruned alike: a standard config (3 of 4 heads: Mistral's, which LlamaConfig refuses); a layer
    # range: fulltune's per-layer record, which the command said before it started
    assert is_pruned_folder(out / "pruned") == ("--layer_start" in argv)
    assert ("loads with fulltune" in log) == ("--layer_start" in argv)
    assert (out / "recovered" / "config.json").is_file() and (out / "recovered" / "fulltune_run.json").is_file()
    results = json.loads((out / "prune_results.json").read_text())
    assert [r["model"] for r in results["results"]] == ["original", "pruned", "recovered"]
