"""What a run tells the outside: metrics.jsonl, TensorBoard scalars, MLflow / W&B runs (fulltune.tracking), a live
progress bar and a plain log.

Only rank 0 writes (a disabled logger does nothing), so the training loop never branches on rank to log.
"""

from __future__ import annotations

import json
import sys
import time
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
        self.trackers: list[Any] = []
        self.last_step = 0
        if not enabled:
            return
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.logfile = open(out / "train.log", "a", encoding="utf-8")
        if cfg.logging.tensorboard and "tensorboard" in cfg.logging.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.log_dir or str(out / "tensorboard"))
        from fulltune.tracking import start_trackers

        self.trackers = start_trackers(cfg, out)

    def _track(self, values: dict[str, float], step: int) -> None:
        """The same scalars to MLflow / W&B as to TensorBoard."""
        self.last_step = max(self.last_step, step)
        for tracker in self.trackers:
            tracker.log(values, step)

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
        for i, v in enumerate(values):
            self._track({"train/loss": v}, step - len(values) + 1 + i)

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
        self._track({**{f"lr/{name}": lr for name, lr in lrs.items()}, "perf/samples_per_s": samples_per_s,
                     "perf/peak_memory_mb": peak_bytes / 2**20}, step)
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
        self._track({f"val/{k}": v for k, v in brief.items() if k != "epoch"}, step)
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
        if self.enabled:
            from fulltune.modelcard import refresh_with_test

            refresh_with_test(self.out)  # the test metrics join the card of the weights they measured
        if self.trackers:
            self._finish_trackers()

    def _finish_trackers(self) -> None:
        """Test metrics from summary.json, then summary.json and report.html as artifacts, then end the runs."""
        summary_path = self.out / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            test = {f"test/{k}": v for k, v in (summary.get("test") or {}).items() if isinstance(v, (int, float))}
            if test:
                self._track(test, max(self.last_step, int(summary.get("optimizer_steps") or 0)))
        files = [p for p in (summary_path, self.out / "report.html") if p.is_file()]
        for tracker in self.trackers:
            if files:
                tracker.artifacts(files)
            tracker.finish()
        self.trackers = []
        if self.jsonl:
            self.jsonl.close()
            self.logfile.close()
