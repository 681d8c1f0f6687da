"""Shared fixtures: tiny random-init model configs, tiny text and image data sets, and the shared real data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
TINY_CLIP = {
    "model_type": "clip",
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "projection_dim": 16,
}
# CLIP with a text tower big enough for a word-level tokenizer of the prompt templates (zero-shot heads).
TINY_CLIP_FULL = {
    **TINY_CLIP,
    "text_config": {**TINY_CLIP["text_config"], "vocab_size": 96, "max_position_embeddings": 32},
}
TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 30522,
    "max_position_embeddings": 256,
}

# Pruning needs more heads than KV groups to remove: 8 query heads in 2 KV groups, 4 layers.
TINY_LLAMA_GQA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 30522,
    "max_position_embeddings": 256,
}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 30522, "n_positions": 256}

POSITIVE = ["a good and great film", "wonderful acting all round", "i loved it", "a real delight", "an excellent story"]
NEGATIVE = ["a bad and boring film", "terrible acting all round", "i hated it", "a real mess", "an awful story"]


def config_kwargs(tiny: dict, **overrides: object) -> dict:
    """A TINY_* dict as keyword arguments of its transformers config class (model_type dropped)."""
    return {k: v for k, v in tiny.items() if k != "model_type"} | overrides


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped, saying so, where there is none (bench/gpu_check.sh's CPU dry mode,
    GPU_CHECK_DRY=1, runs them on the CPU instead: tests/e2e/test_gpu.py decides per test what it can check there)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("GPU_CHECK_DRY") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_text_split(path: Path, n: int, seed: int, header: str = "sentence\tlabel") -> None:
    rng = random.Random(seed)
    lines = [header]
    for i in range(n):
        label = i % 2
        lines.append(f"{rng.choice(POSITIVE if label else NEGATIVE)} number {rng.randint(0, 999)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def text_data(tmp_path: Path) -> Path:
    root = tmp_path / "text"
    root.mkdir()
    write_text_split(root / "train.tsv", 32, 0)
    write_text_split(root / "val.tsv", 8, 1)
    write_text_split(root / "test.tsv", 8, 2)
    return root


def write_images(root: Path, per_class: int, seed: int, size: int = 40) -> None:
    """Two classes that differ by colour, with noise so that augmentation matters."""
    rng = random.Random(seed)
    for name, base in (("ants", (200, 60, 40)), ("bees", (40, 90, 210))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (size + rng.randint(0, 12), size + rng.randint(0, 12)), base)
            px = im.load()
            for _ in range(60):
                x, y = rng.randrange(im.width), rng.randrange(im.height)
                px[x, y] = tuple(rng.randrange(256) for _ in range(3))
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            im.convert("L" if i % 5 == 0 else "RGB").save(d / f"{name}_{i}.{fmt.lower()}", fmt)


@pytest.fixture
def image_data(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root / "train", 6, 0)
    write_images(root / "val", 2, 1)
    write_images(root / "test", 2, 2)
    return root


def base_overrides(out: Path, tiny: dict, **extra: object) -> dict:
    cfg = {
        "output_dir": str(out),
        "model.tiny_config": tiny,
        "hardware.mixed_precision": "no",
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "training.seed": 0,
    }
    cfg.update({k.replace("__", "."): v for k, v in extra.items()})
    return cfg


def tiny_bert_text_config(out: Path, text_data: Path, **extra: object):  # -> fulltune.config.Config
    """The validated config of the tiny BERT on a text data folder (base_overrides + data folder and column)."""
    from fulltune.config import load_config

    return load_config(
        None, base_overrides(out, TINY_BERT, data__data_dir=str(text_data), data__text_column="sentence", **extra)
    )


def tiny_bert_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`fulltune train` argv for the tiny BERT on a text data folder (fp32, quiet); `extra` flags or key=value."""
    import json

    return [
        "train",
        "--data_dir",
        str(data),
        "--output_dir",
        str(out),
        "data.text_column=sentence",
        f"model.tiny_config={json.dumps(TINY_BERT)}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "hardware.mixed_precision=no",
        *extra,
    ]


def parse_cli(*argv: str):  # -> argparse.Namespace
    """The namespace `fulltune ARGV...` parses to (the real parser, every command registered)."""
    from fulltune.cli import build_parser

    args = build_parser().parse_args(list(argv))
    args.argv = list(argv)
    return args


def call_cli(*argv: str) -> int:
    """Run `fulltune ARGV...` in this process and return what the command returned; errors raise as they would
    before the CLI turns them into one line (use `fulltune.cli.main` to test that line)."""
    args = parse_cli(*argv)
    return int(args.func(args) or 0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (a user's clone has none)")
    return SHARED_DATA
