"""`fulltune prune` on a tiny saved Llama: seed-script flags, perplexity before / after / recovered, the pruned and
the recovered folders reload, and errors name the flag."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA, call_cli, config_kwargs, parse_cli
from test_causal_lm import make_bpe_tokenizer, write_corpus
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.errors import ConfigError, DataError
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.model.exported import load_exported
from fulltune.model.pruned import is_pruned_folder, load_pruned
from fulltune.model.pruning import get_layer_shapes
from fulltune.prune.pipeline import RESULTS_FILE, recovery_config

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "hardware.mixed_precision=no"]


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_cli("prune", *argv)


def run(argv: list[str]) -> int:
    return call_cli("prune", *argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune")
    train, valid = write_corpus(root / "train.txt", 300, 0), write_corpus(root / "valid.txt", 40, 1)
    base = root / "base"
    make_bpe_tokenizer(train.read_text(), base)
    torch.manual_seed(0)
    config = LlamaConfig(
        **config_kwargs(
            TINY_LLAMA, hidden_size=64, intermediate_size=128, vocab_size=300, bos_token_id=0, eos_token_id=1
        )
    )
    LlamaForCausalLM(config).save_pretrained(base)
    return {"train": train, "valid": valid, "base": base}


def common(files: dict[str, Path], out: Path) -> list[str]:
    return [
        "--base_model",
        str(files["base"]),
        "--output_dir",
        str(out),
        "--data_file",
        str(files["train"]),
        "--eval_file",
        str(files["valid"]),
    ]


def test_prune_test_after_prune_and_finetune(files, tmp_path):
    out = tmp_path / "out"
    argv = common(files, out) + [
        "--save_ckpt_log_name",
        "tiny",
        "--pruning_ratio",
        "0.5",
        "--prune_mlp",
        "--save_model",
        "--test_after_prune",
        "--importance_samples",
        "4",
        "--importance_seq_len",
        "32",
        "--finetune",
        "--finetune_method",
        "full",
        "--finetune_lr",
        "3e-3",
        "--finetune_epochs",
        "2",
        "--finetune_samples",
        "24",
        "--finetune_batch_size",
        "4",
        "--finetune_seq_len",
        "32",
        "--finetune_grad_accum",
        "1",
        "--finetune_max_grad_norm",
        "1.0",
        "--finetune_weight_decay",
        "0.0",
        "--finetune_warmup_steps",
        "2",
        *QUIET,
    ]
    assert run(argv) == 0
    results = json.loads((out / RESULTS_FILE).read_text())
    rows = {r["model"]: r for r in results["results"]}
    assert list(rows) == ["original", "pruned", "recovered"]
    assert rows["original"]["parameters"] > rows["pruned"]["parameters"] == rows["recovered"]["parameters"]
    assert rows["original"]["tokens"] == rows["pruned"]["tokens"] == rows["recovered"]["tokens"] > 0
    assert results["block_size"] == 32
    # a random model: recovery training on the text must beat both by far
    assert rows["recovered"]["perplexity"] < 0.5 * min(rows["original"]["perplexity"], rows["pruned"]["perplexity"])

    pruned = out / "pruned"
    assert not is_pruned_folder(pruned)  # one shape in every layer: a standard config (test_prune_export.py)
    shapes = [
        (s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])
        for s in get_layer_shapes(load_pruned(pruned))
    ]
    assert shapes == [(2, 1, 64)] * 2
    # The recovery run's export reloads, and `fulltune evaluate` agrees with the table.
    recovered = Path(results["recovered_model"])
    assert recovered.parent == out / "recovery" and not is_pruned_folder(recovered)
    assert get_layer_shapes(load_exported(recovered).model) == get_layer_shapes(load_pruned(pruned))
    metrics = evaluate_checkpoint(recovered, file=str(files["valid"]), output_dir=tmp_path / "eval")
    assert metrics["tokens"] == rows["recovered"]["tokens"]
    assert metrics["perplexity"] == pytest.approx(rows["recovered"]["perplexity"], rel=1e-6)


def test_lora_recovery_and_magnitude_importance(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = common(files, out) + [
        "--pruning_ratio",
        "0.25",
        "--prune_mlp",
        "--importance",
        "magnitude",
        "--layer_start",
        "1",
        "--finetune",
        "--finetune_method",
        "lora",
        "--finetune_lr",
        "1e-3",
        "--finetune_samples",
        "1000",  # more than the file holds: all its blocks, and the recorded config says how many
        "--finetune_seq_len",
        "32",
        "--finetune_batch_size",
        "32",
        *QUIET,
    ]
    assert run(argv) == 0
    results = json.loads((out / RESULTS_FILE).read_text())
    assert [r["model"] for r in results["results"]] == ["original", "pruned", "recovered"]
    said = re.search(
        r"recovery training on (\d+) blocks of 32 tokens of .* \(--finetune_samples 1,000: (\d+) available\)",
        capsys.readouterr().out,
    )
    used = int(said[1])
    assert used == int(said[2]) < 1000
    assert yaml.safe_load((out / "recovery" / "config.yaml").read_text())["data"]["max_samples"] == used
    assert f"| {used} train examples" in (out / "recovery" / "train.log").read_text()
    assert [r["pruned"] for r in results["layers"]] == [False, True]
    # LoRA is merged into the export, which keeps the pruned layout
    merged = load_exported(results["recovered_model"]).model
    assert [s["intermediate_size"] for s in get_layer_shapes(merged)] == [128, 96]
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_flags_config_and_overrides_build_the_recovery_run(files, tmp_path):
    seed = parse(["--base_model", "m", "--finetune"])
    cfg = recovery_config(seed, tmp_path / "pruned")
    # the seed script's defaults
    assert (cfg.method.name, cfg.training.base_learning_rate, cfg.training.num_epochs, cfg.data.max_samples) == (
        "full",
        1e-5,
        1,
        500,
    )
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.training.gradient_accumulation_steps) == (1, 512, 4)
    assert (cfg.training.max_grad_norm, cfg.training.weight_decay, cfg.training.warmup_steps) == (1.0, 0.01, 0)
    assert cfg.training.lr_scheduler == "linear"
    assert cfg.output_dir == str(Path("outputs") / "pruned" / "recovery")
    assert cfg.task == "causal_lm" and cfg.model.name_or_path == str(tmp_path / "pruned")

    yaml_file = tmp_path / "recover.yaml"
    yaml_file.write_text(
        "model:\n  name_or_path: ignored\ntraining:\n  learning_rate: 2.0e-4\n  epochs: 3\ndata:\n  seq_len: 64\n"
    )
    args = parse(
        [
            "--base_model",
            "m",
            "--config",
            str(yaml_file),
            "--finetune_epochs",
            "5",
            "--output_dir",
            str(tmp_path / "o"),
            "--data_file",
            "d.txt",
            "training.seed=7",
            "data.seq_len=128",
        ]
    )
    cfg = recovery_config(args, tmp_path / "o" / "pruned")
    assert cfg.training.base_learning_rate == 2e-4  # from the YAML, not the seed default
    assert cfg.training.num_epochs == 5  # a typed flag wins over the YAML
    assert cfg.data.seq_len == 128 and cfg.training.seed == 7  # key=value wins over both
    assert cfg.training.lr_scheduler == "cosine" and cfg.data.max_samples is None  # no seed defaults with --config
    assert cfg.model.name_or_path == str(tmp_path / "o" / "pruned") and cfg.data.train_file == "d.txt"
    assert cfg.output_dir == str(tmp_path / "o" / "recovery")


def test_errors_name_the_flag(files, tmp_path):
    out = ["--output_dir", str(tmp_path / "o")]
    # (no --data_file / --eval_file: the built-in text is used, see test_prune_guide.py)
    with pytest.raises(DataError, match="--eval_file 'nope.txt'"):
        run(
            [
                "--base_model",
                str(files["base"]),
                "--importance",
                "magnitude",
                "--test_after_prune",
                "--eval_file",
                "nope.txt",
                *out,
            ]
        )
    with pytest.raises(ConfigError, match="--pruning_ratio"):
        run(["--base_model", str(files["base"]), "--importance", "magnitude", "--pruning_ratio", "1.5", *out])
    with pytest.raises(ConfigError, match="--base_model './missing'"):
        run(["--base_model", "./missing", "--importance", "magnitude", *out])
    with pytest.raises(ConfigError, match="unknown config key 'training.lr_rate'"):
        run(["--base_model", str(files["base"]), "--importance", "magnitude", "training.lr_rate=1", *out])
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    for f in files["base"].glob("tokenizer*"):
        (gpt2 / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="not a Llama-family decoder"):
        run(["--base_model", str(gpt2), "--importance", "magnitude", *out])


def test_cli_has_prune():
    args = parse(["--base_model", "m", "--pruning_ratio", "0.3"])
    assert args.func.__module__ == "fulltune.cli.prune" and args.pruning_ratio == 0.3


def test_terminal_is_english_and_the_log_keeps_the_guides_lines(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = common(files, out) + ["--pruning_ratio", "0.5", "--prune_mlp", "--importance", "magnitude"]
    assert run([*argv, "--test_after_prune", *QUIET]) == 0
    terminal = capsys.readouterr().out
    assert not any("\u4e00" <= ch <= "\u9fff" for ch in terminal), terminal  # no CJK on the terminal
    assert "pruned perplexity" in terminal and "loads with plain AutoModelForCausalLM" in terminal
    log = (out / "logs" / "training.log").read_text(encoding="utf-8")
    assert "剪枝后 PPL" in log and "原始模型 PPL" in log
    # Attention groups and MLP channels halved: the blocks lose half but their norms; the 300 x 64 embeddings and
    # head, untouched, are a third of the whole model
    report = json.loads((out / RESULTS_FILE).read_text())["prune"]
    blocks = 1 - report["block_params_after"] / report["block_params_before"]
    assert 0.49 < blocks < 0.5 and f"pruned: blocks {100 * blocks:.1f}% fewer parameters" in terminal
    share = report["embedding_params"] / report["params_before"]
    assert f"embeddings are {share:.1%} of it" in terminal and share > 0.3
    # A layer range: said before it starts that the result needs fulltune's loader
    assert run([*argv, "--layer_start", "1", "--output_dir", str(tmp_path / "uneven")]) == 0
    assert "only layers 1-1 of 0-1 are pruned" in capsys.readouterr().out


def test_an_image_classifier_is_refused_in_one_line(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    from fulltune.cli import main

    vit = tmp_path / "vit"
    ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    ).save_pretrained(vit)
    capsys.readouterr()  # transformers' save progress bar
    assert main(["prune", "--base_model", str(vit), "--output_dir", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fulltune: error: --base_model"), err
    assert "not a causal language model" in err and "ViTForImageClassification" in err


def test_finetune_checks_memory_before_training(files, tmp_path, monkeypatch):
    import importlib

    recommend = importlib.import_module("fulltune.planning.recommend")  # the module (the package exports a function)
    out = tmp_path / "out"
    argv = common(files, out) + ["--importance", "magnitude", "--finetune", "--finetune_seq_len", "32", *QUIET]
    monkeypatch.setattr(recommend, "available_memory", lambda device_type: 2**20)  # 1 MiB free
    with pytest.raises(
        ConfigError, match=r"the recovery run is estimated to peak at ~.*but 1.00 MiB of cpu memory"
    ) as e:
        run(argv)
    assert "training.memory=lean" in str(e.value) and "method.name=lora" in str(e.value)
    assert not (out / "recovery").exists()  # refused before training started
