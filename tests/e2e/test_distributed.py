"""Data parallelism on CPU with 2 processes (gloo, tiny BERT): DDP and FSDP give the weights of one process with
the same global batch, checkpoints resume on another world size, and a failing rank stops every rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_train_args
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run_fulltune(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "fulltune",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "fulltune", *args]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FULLTUNE_DIST_TIMEOUT": "60"}
    import os

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def text_train_args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return tiny_bert_train_args(
        data,
        out,
        "model.dropout=0.0",
        "training.seed=0",
        f"data.batch_size={batch}",
        "logging.log_every_steps=1",
        "checkpoint.keep_last=0",
        "checkpoint.save_best=false",
        *extra,
    )


def last_weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "model.safetensors"))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("split") != "val"}


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, text_data, parallel):
    steps = ["training.max_steps=3", "training.num_epochs=1"]
    ok(run_fulltune(text_train_args(text_data, tmp_path / "one", 8, *steps)))
    ok(run_fulltune(text_train_args(text_data, tmp_path / "two", 4, *steps, f"training.parallel={parallel}"), nproc=2))
    one, two = last_weights(tmp_path / "one", "checkpoint-step-3"), last_weights(tmp_path / "two", "checkpoint-step-3")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    # Logged losses are global means, the same as the single process's.
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (1, 2, 3):
        assert abs(l1[step] - l2[step]) < 1e-5


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_on_another_world_size(tmp_path, text_data, parallel):
    steps = [
        "training.max_steps=4",
        "training.num_epochs=1",
        "checkpoint.save_every_steps=2",
        f"training.parallel={parallel}",
    ]
    ok(run_fulltune(text_train_args(text_data, tmp_path / "full", 4, *steps), nproc=2))
    reference = losses(tmp_path / "full")
    state = tmp_path / "full" / "checkpoint-step-2" / "training_state"
    if parallel == "fsdp":  # one file set per rank, no gathered optimizer state; the export consolidated from them
        names = {p.name for p in (state / "sharded").iterdir()}
        assert names == {
            f"{kind}-rank{r}.{ext}"
            for r in (0, 1)
            for kind, ext in (("model", "safetensors"), ("optim", "safetensors"), ("index", "json"))
        }
        assert not (state / "optimizer.pt").exists()
        index = json.loads((state / "sharded" / "index-rank1.json").read_text())["tensors"]
        assert index["optim/bert.embeddings.word_embeddings.weight/exp_avg"]["start"] == 30522 // 2
        assert (tmp_path / "full" / "checkpoint-step-2" / "model.safetensors").is_file()
    for nproc, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"resumed{nproc}"
        out.mkdir()
        shutil.copytree(tmp_path / "full" / "checkpoint-step-2", out / "checkpoint-step-2")
        ok(run_fulltune(text_train_args(text_data, out, batch, *steps) + ["--resume", "auto"], nproc=nproc))
        resumed = losses(out)
        for step in (3, 4):
            assert abs(resumed[step] - reference[step]) < 1e-5, (nproc, step, resumed, reference)
        a, b = last_weights(tmp_path / "full", "checkpoint-step-4"), last_weights(out, "checkpoint-step-4")
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


def test_failing_rank_stops_all_ranks(tmp_path, text_data):
    """Rank 0 dies (SIGKILL inside its first checkpoint save, through the save's test kill point) while rank 1 waits
    for it: every rank exits, no hang. (A bad image no longer fails a rank: it is skipped and counted.)"""
    import os

    start = time.monotonic()
    env_before = os.environ.get("FULLTUNE_KILL_AT")
    os.environ["FULLTUNE_KILL_AT"] = "inside-save:1"
    try:
        proc = run_fulltune(
            text_train_args(text_data, tmp_path / "out", 4, "training.parallel=ddp", "checkpoint.save_every_steps=2"),
            nproc=2,
            timeout=240,
        )
    finally:
        if env_before is None:
            os.environ.pop("FULLTUNE_KILL_AT", None)
        else:
            os.environ["FULLTUNE_KILL_AT"] = env_before
    assert proc.returncode != 0
    assert time.monotonic() - start < 200
    assert "SIGKILL" in proc.stderr or "-9" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "checkpoint-step-2").exists()  # the killed save left no half checkpoint


def test_ddp_trains_a_head_that_leaves_parameters_unused(tmp_path, image_data):
    """CLIPForImageClassification never uses the vision tower's post_layernorm: DDP is told to expect that (and only
    for such a model), so two processes train where plain DDP would stop at the first step."""
    from conftest import TINY_BERT, TINY_CLIP, base_overrides

    from fulltune.config import load_config
    from fulltune.model.prepare import prepare_model
    from fulltune.runtime.distributed import unreached_parameters
    from fulltune.training.tasks import TASKS

    def unreached(tiny, task, batch):
        cfg = load_config(None, base_overrides(tmp_path / "probe", tiny))
        _, model, _ = prepare_model(cfg, task, ["a", "b"], torch.device("cpu"))
        state = torch.get_rng_state()
        names = unreached_parameters(model, lambda m: TASKS[task].loss(m, batch, 0.0)[0])
        assert torch.equal(torch.get_rng_state(), state) and all(p.grad is None for p in model.parameters())
        return names

    pixels = {"pixel_values": torch.randn(1, 3, 32, 32), "labels": torch.tensor([1])}
    assert unreached(TINY_CLIP, "image_classification", pixels) == {
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    }
    ids = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert unreached(TINY_BERT, "text_classification", ids | {"labels": torch.tensor([0])}) == set()
    args = [
        "train",
        "--data_dir",
        str(image_data),
        "--output_dir",
        str(tmp_path / "run"),
        f"model.tiny_config={json.dumps(TINY_CLIP)}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "hardware.mixed_precision=no",
        "data.batch_size=2",
        "training.num_epochs=1",
        "data.num_workers=0",
    ]
    ok(run_fulltune(args, nproc=2))
