"""Rank 0's memory while an FSDP checkpoint is written: checkpoint.fsdp_state=sharded (every rank writes its own
shards) against full (model and optimizer state gathered on rank 0, fulltune's old way), 2 CPU processes (gloo).

Each mode runs under its own torchrun: a Llama (~60M parameters by default) trains one step through fulltune's
setup, then the trainer's own checkpoint function writes one checkpoint while a thread samples each rank's resident
set size every 2 ms. Printed: the rise of RSS during the save over RSS just before it, per rank, in bytes/parameter,
and the files each rank wrote.

    .venv/bin/python bench/fsdp_checkpoint_memory.py [--hidden 512 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(BENCH))
    from synthetic_lm import write_corpus, write_tokenizer

    from fulltune.config import load_config
    from fulltune.runtime.device import to_device
    from fulltune.runtime.ranks import barrier, rank
    from fulltune.state.checkpoint import save_fsdp_checkpoint
    from fulltune.training.optim import optimizer_step
    from fulltune.training.tasks import TASKS
    from fulltune.training.trainer import setup

    work = Path(a.work)
    if rank() == 0:
        write_tokenizer(work / "tok", a.vocab)
        write_corpus(work / "train.txt", 64 * 32, a.vocab)
    barrier_file = work / "ready"
    if rank() == 0:
        barrier_file.write_text("1")
    while not barrier_file.exists():
        time.sleep(0.1)
    tiny = {
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.hidden * 8 // 3,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.hidden // 64,
        "num_key_value_heads": a.hidden // 64,
        "vocab_size": a.vocab,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    cfg = load_config(
        None,
        {
            "task": "causal_lm",
            "output_dir": str(work / a.mode),
            "model.tiny_config": tiny,
            "model.tokenizer": str(work / "tok"),
            "data.train_file": str(work / "train.txt"),
            "data.seq_len": 32,
            "data.batch_size": 2,
            "data.num_workers": 0,
            "hardware.mixed_precision": "no",
            "training.parallel": "fsdp",
            "checkpoint.fsdp_state": a.mode,
            "logging.progress_bar": False,
            "logging.tensorboard": False,
        },
    )
    run = setup(cfg)
    task = TASKS[run.task_name]
    batch = to_device(next(iter(run.make_loader(run.data.train, batch_sampler=run.sampler))), run.device)
    loss_sum, _ = task.loss(run.model, batch, 0.0)
    (loss_sum / task.count(batch)).backward()
    optimizer_step(run.model, run.optimizer, run.scaler, cfg.training.max_grad_norm)  # the optimizer state exists now
    n_params = sum(p.numel() for p in run.model.parameters())
    barrier()
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    save_fsdp_checkpoint(
        Path(cfg.output_dir) / "checkpoint",
        run.model,
        run.bundle,
        run.optimizer,
        run.scaler,
        run.state,
        cfg,
        run._meta(),
    )
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    out = {
        "rank": rank(),
        "params": n_params,
        "rss_before": before,
        "rss_peak_during_save": peak[0],
        "rise_bytes_per_param": (peak[0] - before) / n_params,
        "save_s": seconds,
    }
    (work / f"{a.mode}-rank{rank()}.json").write_text(json.dumps(out))
    barrier()
    torch.distributed.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", default="full,sharded")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    src = str(BENCH.parent / "src")
    env = {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }  # freed tensors go back to the OS: RSS follows live bytes
    rows = []
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--worker",
                "--mode",
                mode,
                "--work",
                tmp,
                "--hidden",
                str(a.hidden),
                "--layers",
                str(a.layers),
                "--vocab",
                str(a.vocab),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            ckpt = Path(tmp) / mode / "checkpoint" / "training_state"
            files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
            for r in (0, 1):
                row = json.loads((Path(tmp) / f"{mode}-rank{r}.json").read_text())
                rows.append({"mode": mode, **row, "state_files": files})
    n = rows[0]["params"]
    print(f"{n / 1e6:.1f}M parameters, fp32 AdamW (12 bytes/param of weights + state), 2 processes\n")
    print("| fsdp_state | rank | RSS rise during save, bytes/param | MB | save s |")
    print("|---|---|---|---|---|")
    for r in rows:
        rise = r["rss_peak_during_save"] - r["rss_before"]
        print(
            f"| {r['mode']} | {r['rank']} | {r['rise_bytes_per_param']:.2f} | {rise / 2**20:.0f} | {r['save_s']:.2f} |"
        )
    for mode in a.modes.split(","):
        files = next(r["state_files"] for r in rows if r["mode"] == mode)
        print(f"\n{mode}: training_state/ holds {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
