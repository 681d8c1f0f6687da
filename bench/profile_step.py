"""Where one training step of the `make bench` job goes: data, forward, backward, clipping, optimizer step, and the
share of the step that the AdamW update of the word-embedding matrix takes (timed alone on the same tensors).

    .venv/bin/python bench/profile_step.py [--steps 30] [--precision auto|bf16|no] [--method full|lora|...]
                                          [--set key=value ...]
                                          [--ops 15]   (also the top operators by self CPU time, torch.profiler)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--method", default="full", help="method.name: full, partial, lora, linear_probe")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. method.lora.dropout=0")
    ap.add_argument("--ops", type=int, default=0, help="print this many top operators of 5 profiled steps")
    args = ap.parse_args()
    if not SST2.is_dir():
        print(f"skipped: {SST2} is not present")
        return 0
    from fulltune.config import load_config
    from fulltune.runtime.device import to_device
    from fulltune.training.optim import optimizer_step
    from fulltune.training.tasks import TASKS
    from fulltune.training.trainer import setup

    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.tsv"
        lines = open(SST2 / "train.tsv", encoding="utf-8").readlines()[:2049]
        train_file.write_text("".join(lines), encoding="utf-8")
        cfg = load_config(
            None,
            {
                "task": "text_classification",
                "output_dir": str(Path(tmp) / "run"),
                "data.train_file": str(train_file),
                "data.text_column": "sentence",
                "data.max_length": 64,
                "data.batch_size": 32,
                "training.base_learning_rate": 1e-4,
                "training.num_epochs": 1,
                "hardware.mixed_precision": args.precision,
                "method.name": args.method,
                **dict(o.split("=", 1) for o in args.set),
            },
        )
        run = setup(cfg)
        task = TASKS[run.task_name]
        loader = run.make_loader(run.data.train, batch_sampler=run.sampler)
        run.model.train()
        phases: dict[str, list[float]] = {k: [] for k in ("data", "forward", "backward", "clip+step", "total")}
        it = iter(loader)
        for step in range(min(args.steps, len(run.sampler))):
            t0 = time.perf_counter()
            batch = to_device(next(it), run.device)
            t1 = time.perf_counter()
            with run.precision.autocast():
                loss_sum, _ = task.loss(run.model, batch, 0.0)
                loss = loss_sum / task.count(batch)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            optimizer_step(run.model, run.optimizer, run.scaler, cfg.training.max_grad_norm)
            t4 = time.perf_counter()
            if step >= 3:  # skip warm-up
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                    phases[k].append(v)
        if args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    batch = to_device(next(it), run.device)
                    with run.precision.autocast():
                        loss_sum, _ = task.loss(run.model, batch, 0.0)
                    (loss_sum / task.count(batch)).backward()
                    optimizer_step(run.model, run.optimizer, run.scaler, cfg.training.max_grad_norm)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
        med = {k: statistics.median(v) for k, v in phases.items()}
        print(f"mean step {1000 * statistics.mean(phases['total']):.1f} ms over {len(phases['total'])} steps")
        print(
            f"precision {run.precision.name}, {torch.get_num_threads()} threads, "
            f"median over {len(phases['total'])} steps:"
        )
        for k, v in med.items():
            print(f"  {k:<10} {1000 * v:8.1f} ms  {100 * v / med['total']:5.1f}%")
        # The embedding's share of the optimizer step: the same fused AdamW on that one matrix.
        emb = run.model.get_input_embeddings().weight
        p = emb.detach().clone().requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        e = statistics.median(times[2:])
        print(
            f"  AdamW over the word embeddings alone ({p.numel() / 1e6:.1f}M of "
            f"{sum(q.numel() for q in run.model.parameters()) / 1e6:.1f}M parameters): {1000 * e:.1f} ms, "
            f"{100 * e / med['total']:.1f}% of a step"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
