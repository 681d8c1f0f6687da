"""What a run tells the outside: metrics.jsonl, TensorBoard scalars, MLflow / W&B runs (fulltune.report.trackers), a
live
progress bar, a timestamped train.log, run_history.jsonl (every start and resume) and report.html (rebuilt at every
evaluation, see report_html).

Only rank 0 writes (a disabled logger does nothing), so the training loop never branches on rank to log.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config
from fulltune.data.records import split_size
from fulltune.files.rundir import write_atomic
from fulltune.report.html import build_report, fmt, read_jsonl, write_eval_record
from fulltune.report.trackers import start_trackers


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
        self.epoch = 0
        self.labels: list[str] | None = None
        self.describe: dict[str, Any] = {}  # split -> function(example index) -> a short text of that input
        self.trackers: list[Any] = []
        self.last_step = 0
        self.step_losses: list[tuple[int, float]] = []  # (optimizer step, loss) since the last train row
        self.tokens_per_sample: int | None = None  # causal LM: every sample is a block of seq_len tokens
        if not enabled:
            return
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        if self.jsonl.tell() and _last_byte(out / "metrics.jsonl") != b"\n":
            self.jsonl.write("\n")  # a kill mid-line left a fragment: the resumed run's first record starts anew
        self.logfile = open(out / "train.log", "a", encoding="utf-8")
        if cfg.logging.tensorboard and "tensorboard" in cfg.logging.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.log_dir or str(out / "tensorboard"))

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
        self._log_line(message)

    def _log_line(self, message: str) -> None:
        """train.log only: every line stamped with the UTC time."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        self.logfile.write("".join(f"{stamp} {line}\n" for line in message.splitlines() or [""]))
        self.logfile.flush()

    def started(self, run: Any, resume: str | None = None) -> None:
        """Record a start or a resume (from where, at which step; a changed schedule is said) in train.log,
        run_history.jsonl and the report; remember how to show example inputs of each split."""

        data = getattr(run, "data", None)
        self.labels = getattr(data, "labels", None)
        tokenizer = getattr(run.bundle, "tokenizer", None)
        self.tokens_per_sample = self.cfg.data.seq_len if run.task_name == "causal_lm" else None
        for split in ("val", "test"):
            ds = getattr(data, split, None)
            if ds is not None:
                self.describe[split] = _describer(ds, tokenizer)
        if not self.enabled:
            return
        state, cfg = run.state, self.cfg
        previous = read_jsonl(self.out / "run_history.jsonl")
        resumed = state.optimizer_step > 0 or state.epoch > 0
        note = ""
        if resumed and previous and previous[-1].get("total_steps") not in (None, state.total_steps):
            note = (
                f"the schedule changed: {previous[-1]['total_steps']} -> {state.total_steps} optimizer steps in all; "
                f"the {cfg.training.lr_scheduler} learning-rate schedule is recomputed over the new total from "
                f"step {state.optimizer_step} on"
            )
        trainable, total = _count(run.model)

        present = [w for w in ("train", "val", "test") if getattr(data, w, None) is not None]
        sizes = {w: split_size(getattr(data, w)) for w in present}
        metric = run.metric_name
        event = {
            "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "event": "resume" if resumed else "start",
            "resumed_from": resume if resumed else None,
            "optimizer_step": state.optimizer_step,
            "epoch": state.epoch,
            "total_steps": state.total_steps,
            "note": note,
            "task": run.task_name,
            "method": cfg.method.name,
            "model": cfg.model.describe(),
            "metric": metric,
            "data_sizes": sizes,
            "num_classes": len(self.labels) if self.labels and run.task_name != "text_regression" else None,
            "precision": run.precision.name,
            "device": str(run.device),
            "world_size": state.world_size,
            "global_batch": cfg.data.batch_size * cfg.training.gradient_accumulation_steps * (state.world_size or 1),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "tokens_per_sample": self.tokens_per_sample,
        }
        with open(self.out / "run_history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        if resumed:
            self._drop_replayed(state)
            self.info(
                f"resumed from {resume} at optimizer step {state.optimizer_step} of {state.total_steps} "
                f"(epoch {state.epoch}, batch {state.batches_done})" + (f"; {note}" if note else "")
            )
        else:
            self.info(f"started: {state.total_steps} optimizer steps planned, output in {self.out}")
        self._rebuild()

    def _drop_replayed(self, state: Any) -> None:
        """On a resume at optimizer step S, metrics.jsonl keeps the rows of the run up to its checkpoint: the rows
        of later steps, and a validation row at S that the checkpoint does not hold (it was saved before that
        evaluation), are written again when the resumed run gets there; kept, each would show twice."""
        step, held = state.optimizer_step, {h.get("step") for h in state.history}
        path = self.out / "metrics.jsonl"
        rows = read_jsonl(path)
        kept = [r for r in rows if _kept(r, step, held)]
        if len(kept) == len(rows) or self.jsonl is None:
            return
        self.jsonl.close()
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = open(path, "a", encoding="utf-8")

    def lr_schedule(
        self, optimizer: torch.optim.Optimizer, lrs_at: Callable[[int], list[float]], total_steps: int
    ) -> None:
        """report/lr_schedule.json: each group's learning rate over the whole schedule, from `lrs_at(update index)`
        (one LR per param group), at every optimizer step up to 1,000 steps and at 1,000 evenly spaced ones beyond,
        so the report draws warmup and decay as they are, not just the logged points."""
        if not (self.enabled and total_steps > 0):
            return
        every = max(1, math.ceil(total_steps / 1000))
        steps = sorted({*range(1, total_steps + 1, every), total_steps})
        values = [lrs_at(step - 1) for step in steps]  # the update that ends at optimizer step `step`
        names = _group_names(optimizer)
        record = {"steps": steps, "lrs": {name: [v[i] for v in values] for i, name in enumerate(names)}}
        folder = self.out / "report"
        folder.mkdir(exist_ok=True)
        write_atomic(folder / "lr_schedule.json", json.dumps(record))

    def _rebuild(self, with_png: bool = False) -> None:
        try:
            build_report(self.out, with_png=with_png)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a report must never stop training
            self._log_line(f"report.html not written: {err}")

    def split_metrics(self, name: str, metrics: dict[str, Any], split: str | None = None, **extra: Any) -> None:
        """Keep what the report shows of an evaluation (report/<name>.json: confusion matrix, confused examples)."""
        if not self.enabled:
            return

        split = split or name
        write_eval_record(self.out, name, metrics, self.labels, self.describe.get(split), split=split, **extra)

    def start_progress(self, total: int, initial: int) -> None:
        if not (self.enabled and self.cfg.logging.progress_bar):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )

    def advance(self, epoch: int, state: Any) -> None:
        self.epoch = epoch
        if self.bar is None:
            return
        self.bar.update(1)
        # Epoch progress from counters already on the host: no device sync here.
        self.bar.set_description(f"epoch {epoch + 1}", refresh=False)

    def loss_values(self, step: int, values: list[float]) -> None:
        """Per-step losses flushed at a log point (already on the host)."""
        self.last_loss = sum(values) / len(values)
        self.step_losses += [(step - len(values) + 1 + i, v) for i, v in enumerate(values)]
        if self.writer:
            for i, v in enumerate(values):
                self.writer.add_scalar("train/loss", v, step - len(values) + 1 + i)
        for i, v in enumerate(values):
            self._track({"train/loss": v}, step - len(values) + 1 + i)

    def scalars(
        self,
        step: int,
        optimizer: torch.optim.Optimizer,
        samples_per_s: float,
        peak_bytes: int,
        grad_norm: float | None = None,
        epoch: int | None = None,
    ) -> None:
        if not self.enabled:
            return
        lrs = dict(zip(_group_names(optimizer), (g["lr"] for g in optimizer.param_groups), strict=True))
        top_lr = max(lrs.values()) if lrs else 0.0
        self.last_lr = top_lr
        self.throughputs.append(samples_per_s)
        epoch = self.epoch + 1 if epoch is None else epoch  # 1-based: the epoch in progress
        row = {
            "step": step,
            "split": "train",
            "epoch": epoch,
            "loss": self.last_loss,
            "lr": top_lr,
            "lrs": lrs,
            "grad_norm": grad_norm,
            "samples_per_s": samples_per_s,
            **({"tokens_per_s": samples_per_s * self.tokens_per_sample} if self.tokens_per_sample else {}),
            "step_losses": [[s, v] for s, v in self.step_losses if s <= step],  # every step's loss, for the curves
            "peak_memory_mb": peak_bytes / 2**20,
            "time_s": time.perf_counter() - self.start,
        }
        self.step_losses = [(s, v) for s, v in self.step_losses if s > step]
        self._record(row)
        rate = f"{samples_per_s:.1f} samples/s" + (
            f" ({row['tokens_per_s']:,.0f} tokens/s)" if "tokens_per_s" in row else ""
        )
        norm = f" | grad norm {grad_norm:.3g}" if grad_norm is not None else ""
        self._log_line(
            f"step {step} epoch {epoch}: loss {self.last_loss:.4g} | lr {top_lr:.3g}{norm} | "
            f"{rate} | peak memory {peak_bytes / 2**20:,.0f} MiB"
        )
        if self.writer:
            for name, lr in lrs.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("perf/samples_per_s", samples_per_s, step)
            self.writer.add_scalar("perf/peak_memory_mb", peak_bytes / 2**20, step)
        self._track(
            {
                **{f"lr/{name}": lr for name, lr in lrs.items()},
                "perf/samples_per_s": samples_per_s,
                "perf/peak_memory_mb": peak_bytes / 2**20,
            },
            step,
        )
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
        self.split_metrics("val_latest", metrics, split="val", step=step, epoch=epoch)
        if improved:
            self.split_metrics("val_best", metrics, split="val", step=step, epoch=epoch)
        self._rebuild()

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
        if self.enabled:
            self._rebuild(with_png=True)
        if self.writer:
            self.writer.close()
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


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]


def _count(model: Any) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _kept(row: Any, step: int, held: set[Any]) -> bool:
    """Whether a metrics.jsonl row belongs to the run up to a checkpoint at `step` that holds the evaluations of
    the steps in `held`."""
    at = row.get("step") if isinstance(row, dict) else None
    if not isinstance(at, int) or at < step:
        return True
    return at == step and (row.get("split") != "val" or at in held)


def _describer(dataset: Any, tokenizer: Any) -> Any:
    """index -> a short text of that example's input: the image path, the text as written (about 200 characters, cut
    at a word), or else the decoded tokens."""
    folder = getattr(dataset, "folder", None)
    if folder is not None:
        return lambda i: str(folder.samples[i][0])
    texts = getattr(dataset, "texts", None)
    if texts is not None:
        return lambda i: shorten(texts[i])
    ids = getattr(dataset, "input_ids", None)
    if ids is not None and tokenizer is not None:
        return lambda i: tokenizer.decode(ids[i], skip_special_tokens=True)[:200]
    return lambda i: f"example {i}"


def shorten(text: str, limit: int = 200) -> str:
    """`text` on one line, cut at the last word boundary before `limit` characters (with an ellipsis)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] if " " in flat[:limit] else flat[:limit]
    return cut + " …"


def done_line(summary: dict[str, Any]) -> str:
    """The last log line, rounded for people (summary.json keeps full precision)."""

    best = summary.get("best_val") or {}
    metric = next((k for k in best if k != "step"), None)
    parts = [f"done: {summary.get('optimizer_steps')} optimizer steps"]
    if metric and best.get(metric) is not None:
        parts.append(f"best val {metric} {fmt(best[metric])} at step {best.get('step')}")
    test = summary.get("test") or {}
    shown = ", ".join(f"{k} {fmt(v)}" for k, v in test.items() if isinstance(v, float))
    if shown:
        parts.append(f"test ({test.get('weights')} weights): {shown}")
    if summary.get("wall_time_s") is not None:
        parts.append(f"{summary['wall_time_s']:.1f} s")
    return " | ".join(parts) + f" | report: {Path(summary.get('output_dir', '.')) / 'report.html'}"


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)
