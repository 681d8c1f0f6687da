"""What a run tells the outside: metrics.jsonl, TensorBoard scalars, a live progress bar and a plain log.

Only rank 0 writes (a disabled logger does nothing), so the training loop never branches on rank to log.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config


class RunLogger:
    def __init__(self, cfg: Config, out: Path, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.out = out
        self.bar = None
        self.writer = None
        self.jsonl = None
        self.start = time.perf_counter()
        self.throughputs: list[float] = []
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        if not enabled:
            return
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.logfile = open(out / "train.log", "a", encoding="utf-8")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.log_dir or str(out / "tensorboard"))

    def _record(self, row: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)
        self.logfile.write(message + "\n")
        self.logfile.flush()

    def start_progress(self, total: int, initial: int) -> None:
        if not (self.enabled and self.cfg.logging.progress_bar):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5)

    def advance(self, epoch: int, state: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        # Epoch progress from counters already on the host: no device sync here.
        self.bar.set_description(f"epoch {epoch + 1}", refresh=False)

    def loss_values(self, step: int, values: list[float]) -> None:
        """Per-step losses flushed at a log point (already on the host)."""
        self.last_loss = sum(values) / len(values)
        if self.writer:
            for i, v in enumerate(values):
                self.writer.add_scalar("train/loss", v, step - len(values) + 1 + i)

    def scalars(self, step: int, optimizer: torch.optim.Optimizer, samples_per_s: float, peak_bytes: int) -> None:
        if not self.enabled:
            return
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        top_lr = max(lrs.values()) if lrs else 0.0
        self.last_lr = top_lr
        self.throughputs.append(samples_per_s)
        row = {"step": step, "loss": self.last_loss, "lr": top_lr, "samples_per_s": samples_per_s,
               "peak_memory_mb": peak_bytes / 2**20, "time_s": time.perf_counter() - self.start}
        self._record(row)
        if self.writer:
            for name, lr in lrs.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
            self.writer.add_scalar("perf/samples_per_s", samples_per_s, step)
            self.writer.add_scalar("perf/peak_memory_mb", peak_bytes / 2**20, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{top_lr:.2e}", refresh=False)

    def eval(self, step: int, epoch: int, metrics: dict[str, Any], metric: str, improved: bool) -> None:
        if not self.enabled:
            return
        brief = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._record({"step": step, "epoch": epoch, "split": "val", **brief})
        if self.writer:
            for k, v in brief.items():
                self.writer.add_scalar(f"val/{k}", v, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in brief.items() if isinstance(v, float))
        self.info(f"[val] step {step} epoch {epoch}: {shown}{'  (best so far)' if improved else ''}")

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> dict[str, Any]:
        tps = sorted(self.throughputs[1:] or self.throughputs)  # the first window includes start-up
        return {
            "wall_time_s": time.perf_counter() - self.start,
            "samples_per_s_median": tps[len(tps) // 2] if tps else None,
        }

    def close(self) -> None:
        self.close_progress()
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
            self.logfile.close()


@dataclass
class Throughput:
    """Training throughput: samples per second of optimisation, with evaluation and checkpoint time left out."""

    samples_at_start: int
    start: float = field(default_factory=time.perf_counter)
    side_seconds: float = 0.0
    """Time spent outside optimisation (evaluation, checkpoints)."""
    window_start: float = field(default_factory=time.perf_counter)
    window_samples: int = 0

    def __post_init__(self) -> None:
        self.window_samples = self.samples_at_start

    def window_rate(self, samples_seen: int) -> float:
        """Samples per second since the previous call (the log window), and start a new window."""
        now = time.perf_counter()
        rate = (samples_seen - self.window_samples) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_samples = now, samples_seen
        return rate

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Time inside this block is not training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.side_seconds += time.perf_counter() - began

    def totals(self, samples_seen: int) -> tuple[float, float]:
        """(training seconds, training samples per second) since the start."""
        seconds = max(time.perf_counter() - self.start - self.side_seconds, 1e-9)
        return seconds, (samples_seen - self.samples_at_start) / seconds
