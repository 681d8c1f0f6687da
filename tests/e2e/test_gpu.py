"""The CUDA paths, each on a tiny Llama trained a few steps through the real trainer: fp16 with GradScaler, bf16,
lean mode (fused BF16AdamW, and bitsandbytes' 8-bit AdamW), DDP and FSDP on NCCL with one process, torch.compile.

Marked `gpu`: skipped without CUDA, except in the CPU dry mode of bench/gpu_check.sh (GPU_CHECK_DRY=1), which runs
the same tests on the CPU wherever the path exists there (bf16, lean, gloo instead of NCCL, compile) and skips
the CUDA-only ones (fp16 loss scaling; 8-bit AdamW where bitsandbytes is missing).
"""

from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from synthetic_lm import write_corpus, write_tokenizer  # noqa: E402

from fulltune.config import MethodConfig, load_config  # noqa: E402
from fulltune.training.trainer import setup, train  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 512
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
DRY = os.environ.get("GPU_CHECK_DRY") == "1"


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if DRY:
        return "cpu"
    pytest.skip("needs CUDA (bash bench/gpu_check.sh --dry-run runs these on the CPU)")


def needs_cuda(device: str, what: str) -> None:
    if device != "cuda":
        pytest.skip(f"{what} needs CUDA (dry mode on CPU)")


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    return write_tokenizer(root / "tok", VOCAB), write_corpus(root / "train.txt", 40 * 32, VOCAB, seed=0, sentences=8)


def lm_overrides(out: Path, files: tuple[Path, Path], device: str, **extra: object) -> dict:
    tok, corpus = files
    cfg = {
        "task": "causal_lm",
        "output_dir": str(out),
        "model.tiny_config": TINY,
        "model.tokenizer": str(tok),
        "model.dropout": 0.0,
        "data.train_file": str(corpus),
        "data.seq_len": 32,
        "data.batch_size": 4,
        "hardware.device": device,
        "hardware.mixed_precision": "no",
        "training.base_learning_rate": 1e-2,
        "training.warmup_ratio": 0.0,
        "training.max_steps": 8,
        "training.seed": 0,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "logging.log_every_steps": 1,
        "checkpoint.save_every_epochs": 0,
        "checkpoint.save_best": False,
    }
    cfg.update({k.replace("__", "."): v for k, v in extra.items()})
    return cfg


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("loss") is not None and r.get("split") != "val"]


def assert_learns(out: Path, steps: int = 8) -> list[float]:
    values = losses(out)
    assert len(values) == steps, values
    assert all(v == v and abs(v) < 1e4 for v in values), values  # finite
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.2, values  # from ln(512) = 6.2: a real fall
    return values


def test_fp16_with_grad_scaler(tmp_path, lm_files, device):
    needs_cuda(device, "fp16 autocast with loss scaling")
    cfg = load_config(None, lm_overrides(tmp_path / "run", lm_files, device, hardware__mixed_precision="fp16"))
    run = setup(cfg)
    assert run.scaler is not None and run.precision.dtype == torch.float16
    del run
    train(cfg)
    assert_learns(tmp_path / "run")


def test_bf16(tmp_path, lm_files, device):
    summary = train(
        load_config(None, lm_overrides(tmp_path / "run", lm_files, device, hardware__mixed_precision="bf16"))
    )
    assert_learns(tmp_path / "run")
    assert summary["peak_memory_bytes"] > 0


def test_lean_fused_bf16_adamw(tmp_path, lm_files, device):
    cfg = load_config(None, lm_overrides(tmp_path / "run", lm_files, device, training__memory="lean"))
    run = setup(cfg)
    assert run.fused is not None and all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    del run
    train(cfg)
    assert_learns(tmp_path / "run")


@pytest.mark.parametrize(
    ("optimizer", "offload"),
    [("adamw8bit", False), ("adamw4bit", False), ("paged_adamw8bit", False), ("adamw8bit", True)],
    ids=["8bit", "4bit", "paged8bit", "8bit-offload"],
)
def test_lean_lowbit(tmp_path, lm_files, device, optimizer, offload):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'fulltune[lowbit]')")
    if optimizer == "paged_adamw8bit":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (make gpu-wheels, then gpu_check.sh)")
    if DRY and optimizer == "adamw4bit":
        pytest.skip("dry mode on CPU: the 8-bit case runs the same path (tests/e2e/test_lean.py runs both)")
    if optimizer == "paged_adamw8bit" or offload:
        needs_cuda(device, f"lean_optimizer {optimizer} with lean_offload {offload}")
    extra = dict(training__memory="lean", training__lean_optimizer=optimizer, training__lean_offload=offload)
    cfg = load_config(None, lm_overrides(tmp_path / "run", lm_files, device, **extra))
    run = setup(cfg)
    # the 8- and 4-bit moments step inside backward; bitsandbytes' paged optimizer and the CPU offload after it
    assert (run.fused is not None) == (optimizer != "paged_adamw8bit" and not offload)
    del run
    train(cfg)
    assert_learns(tmp_path / "run")


def test_compile_matches_eager(tmp_path, lm_files, device):
    if DRY:
        pytest.skip("inductor's CPU build takes a minute here; test_train.py checks compile on CPU")
    eager = tmp_path / "eager"
    train(load_config(None, lm_overrides(eager, lm_files, device, training__max_steps=3)))
    compiled = tmp_path / "compiled"
    train(load_config(None, lm_overrides(compiled, lm_files, device, training__max_steps=3, training__compile=True)))
    a, b = losses(eager), losses(compiled)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) < 2e-3 * max(1.0, abs(x)), (a, b)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_process_data_parallel(tmp_path, lm_files, device, parallel, monkeypatch, capsys):
    """A process group of one (what torchrun --nproc_per_node=1 sets up): NCCL on CUDA, gloo in dry mode; DDP and
    FSDP train to the weights of the plain run."""
    import torch.distributed as dist

    plain = tmp_path / "plain"
    train(
        load_config(None, lm_overrides(plain, lm_files, device, training__max_steps=3, checkpoint__save_every_epochs=1))
    )
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / parallel
    try:
        train(
            load_config(
                None,
                lm_overrides(
                    out,
                    lm_files,
                    device,
                    training__max_steps=3,
                    checkpoint__save_every_epochs=1,
                    training__parallel=parallel,
                ),
            )
        )
        backend = dist.get_backend()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert backend == ("nccl" if device == "cuda" else "gloo")
    assert f"process group: {backend}, world size 1" in capsys.readouterr().out
    a = load_file(str(plain / "checkpoint-step-3" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-step-3" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


def test_qlora(tmp_path, lm_files, device):
    names = typing.get_args(typing.get_type_hints(MethodConfig)["name"])
    if "qlora" not in names:
        pytest.skip(f"method.name qlora does not exist (methods: {', '.join(names)})")
    pytest.importorskip("bitsandbytes")
    needs_cuda(device, "QLoRA's 4-bit base weights")
    train(load_config(None, lm_overrides(tmp_path / "run", lm_files, device, method__name="qlora")))
    assert_learns(tmp_path / "run")
