"""`fulltune plan`'s direct answer for full fine-tuning in a memory budget: the low-bit optimizers' state sizes match
the optimizer's own buffers (and, slow, the low-bit estimates are within 15% of a dry run); the 8B question is
answered from a folder holding only config.json (meta device, no download); where nothing fits it says by how much
and what fits instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, call_cli

from fulltune import planning as plan
from fulltune.cli.plan import format_report
from fulltune.config import load_config
from fulltune.planning.budget import MODES, placement
from fulltune.planning.dryrun import dry_runs
from fulltune.planning.estimate import Estimate, low_bit_state_bytes
from fulltune.training.lowbit import LowBitAdamW

# Meta-Llama-3-8B's config.json (the shape fields; nothing else is read).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _buffer_bytes(x: torch.Tensor) -> int:
    """Bytes of a plain tensor, or of a torchao quantized state's codes, scales and lookup table."""
    parts = [getattr(x, k) for k in ("codes", "scale", "qmap")] if hasattr(x, "codes") else [x]
    return sum(p.numel() * p.element_size() for p in parts)


@pytest.mark.parametrize("mode", ["adamw8bit", "adamw4bit"])
def test_low_bit_state_bytes_match_the_optimizer(mode: str) -> None:
    pytest.importorskip("torchao.optim")
    # Quantized (>= 4096 elements, a multiple of the block), too small, and not a multiple of the block.
    sizes = [4096 * 3, 256 * 20, 1000, 4096 + 64]
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in sizes]
    opt = LowBitAdamW(params, bits=8 if mode == "adamw8bit" else 4)
    held = sum(_buffer_bytes(opt._zeros(p, True)) + _buffer_bytes(opt._zeros(p, False)) for p in params)
    assert low_bit_state_bytes(mode, sizes) == held
    # A large tensor: 2 x (1 + 4/256) bytes a parameter at 8 bits, 2 x (0.5 + 4/128) at 4 bits.
    per_param = low_bit_state_bytes(mode, [4096 * 4096]) / 4096**2
    assert per_param == pytest.approx(2.03125 if mode == "adamw8bit" else 1.125, abs=1e-3)


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture, device: str, *extra: str) -> tuple[dict, str]:
    folder = tmp_path / "llama3-8b"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))  # no weights, no tokenizer
    argv = ["plan", "--model", str(folder), "--memory_budget", "24GB", "--device", device]  # a causal LM: no --task
    argv += ["--methods", "full", "--no_dry_run", *extra]
    assert call_cli(*argv, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "causal_lm" and report["model"] == str(folder)
    return report, format_report(report)  # the table the same command prints without --json


def test_llama3_8b_in_24gb_on_cuda_from_config_json_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report, table = _plan(tmp_path, capsys, "cuda", "data.seq_len=2048")
    full = report["full_fine_tuning"]
    assert [c["mode"] for c in full["candidates"]] == [m.name for m in MODES][: len(full["candidates"])]
    chosen = full["candidates"][full["chosen"]]
    # bf16 weights (16 GB) leave no room for 8-bit (16 GB) or 4-bit (8.5 GB) moments in 24 GB, and bitsandbytes'
    # paged 8-bit steps after backward, holding 16 GB of bf16 gradients: the state goes to the host.
    assert chosen["keys"]["training.memory"] == "lean" and chosen["keys"]["training.lean_offload"] is True
    assert chosen["keys"]["training.gradient_accumulation_steps"] == 1  # the offloaded step frees each gradient
    assert chosen["device_bytes"] <= full["limit"]
    assert chosen["host_bytes"] == pytest.approx(8.03e9 * 8, rel=0.01)  # bf16 copy, gradient and two moments
    by_mode = {c["mode"]: c for c in full["candidates"]}
    assert not by_mode["lean, paged 8-bit moments"]["fits"]
    four = by_mode["lean, 4-bit moments"]
    assert not four["fits"] and four["estimate"]["weights"] + four["estimate"]["optimizer"] > full["limit"]
    assert four["estimate"]["optimizer"] == pytest.approx(8.03e9 * 1.125, rel=0.02)
    assert by_mode["lean, 8-bit moments"]["estimate"]["optimizer"] == pytest.approx(8.03e9 * 2.03125, rel=0.02)
    answer = next(line for line in table.splitlines() if line.startswith("answer:"))
    assert "training.memory=lean" in answer and "data.seq_len=2048" in answer and "data.batch_size=" in answer
    assert "over by" in table and "cheapest first" in table


def test_llama3_8b_in_24gb_on_cpu_says_by_how_much(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report, table = _plan(tmp_path, capsys, "cpu")
    full = report["full_fine_tuning"]
    assert full["chosen"] is None and full["over"] > 0
    assert any("CUDA only" in s for s in full["skipped"])  # paged states need CUDA's unified memory
    lightest = min(c["device_bytes"] for c in full["candidates"])
    assert lightest - full["limit"] == pytest.approx(full["over"])
    assert "does not fit: the lightest way misses by" in table and "no other method fits either" in table


def test_paged_states_page_out_what_the_gpu_cannot_hold() -> None:
    est = Estimate(
        "full", 1, 10, 10, weights=60.0, gradients=5.0, optimizer=40.0, activations=10.0, peak=115.0, forward_passes=3.0
    )
    assert placement(est, paged=False, limit=100.0) == (115.0, 0.0, False)
    assert placement(est, paged=True, limit=100.0) == (100.0, 15.0, True)  # 15 of the 40 bytes of states page out
    assert placement(est, paged=True, limit=70.0)[2] is False  # the rest (75) does not fit even with every state out


# Small Llama whose optimizer state is a large share of the peak (8.4M parameters in tensors of at most 262k elements,
# which bounds the update's temporaries; 64 tokens a step), so that the low-bit moments' bytes show in the
# measurement; every matrix is quantized (>= 4096 elements, a multiple of 256).
STATE_HEAVY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 128,
}


@pytest.mark.slow  # torchao compiles its update per tensor shape on first use (16-90 s on a 2-core CPU)
@pytest.mark.parametrize("mode", ["adamw8bit", "adamw4bit"])
def test_low_bit_estimates_within_15_percent_of_dry_runs(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("torchao.optim")
    values = base_overrides(tmp_path / "run", STATE_HEAVY_LLAMA, task="causal_lm", hardware__num_threads=1)
    values |= {"data.seq_len": 32, "data.batch_size": 2, "training.memory": "lean", "training.lean_optimizer": mode}
    cfg = load_config(None, values)
    facts = plan.inspect_model(cfg, "causal_lm", None)
    est = plan.estimate(cfg, "causal_lm", facts, "cpu")
    (result,) = dry_runs([(cfg, "causal_lm", None, facts, "cpu")])
    assert "error" not in result, result
    ratio = est.peak / result["measured"]
    print(f"{mode}: estimate {est.peak / 2**20:.1f} MiB, measured {result['measured'] / 2**20:.1f} MiB, {ratio:.3f}")
    assert est.optimizer > 0.15 * est.peak  # the states are a fair share of what is checked
    assert 0.85 <= ratio <= 1.15
