"""The dry run: a few optimizer steps of the configured training on random inputs, in a process forked from one
clean server per method, measuring the peak memory the steps add (CUDA: max_memory_allocated; CPU: peak RSS, the
pages of shared libraries left out)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, config_from_dict, to_dict
from fulltune.model.trainable import param_groups
from fulltune.planning.facts import Facts, inspect_model, prepare
from fulltune.runtime.device import resolve_precision
from fulltune.runtime.memory import maxrss_bytes
from fulltune.runtime.rng import seed_everything
from fulltune.training.lean_fused import attach_fused_step, fuses_step
from fulltune.training.optim import build_optimizer, optimizer_step
from fulltune.training.tasks import task_record


def _library_pages() -> int:
    """Resident bytes of shared libraries and executables mapped into this process (/proc/self/smaps), 0 if unknown.
    The steps fault in library pages of the kernels they run, more or fewer with what the page cache holds (the
    kernel maps cached neighbours of each faulted page): shared, evictable, and not memory that training holds.
    File pages of anything else count: a memory-mapped weight that the optimizer writes turns from file to anonymous
    memory without changing the RSS."""
    total, library = 0, False
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                path = head[5] if len(head) == 6 else ""
                library = path.startswith("/") and ("x" in head[1] or ".so" in Path(path).name)
            elif library and head[0] == "Rss:":
                total += int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc. getrusage's ru_maxrss (the fallback) of a process
    started with fork+exec may be its parent's peak (Linux keeps the larger of the two)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = maxrss_bytes()
        return peak, peak


def _reset_peak_rss() -> bool:
    """Return freed heap pages to the OS and restart the peak-RSS counter at the current RSS (Linux only)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _random_batch(task: str, f: Facts, micro_batch: int, num_labels: int) -> dict[str, torch.Tensor]:
    """Inputs of the configured shape (text padded to max_length: the worst case of dynamic padding)."""
    g = torch.Generator().manual_seed(0)
    if task == "image_classification":
        side = math.isqrt(f.pixels // 3)
        return {
            "pixel_values": torch.randn(micro_batch, 3, side, side, generator=g),
            "labels": torch.randint(0, num_labels, (micro_batch,), generator=g),
        }
    ids = torch.randint(5, max(f.vocab, 6), (micro_batch, f.tokens), generator=g)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids.clone()}
    if task == "token_classification":  # every sub-token tagged: the most a sentence of max_length scores
        tags = torch.randint(0, num_labels, (micro_batch, f.tokens), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": tags}
    multi = task == "multi_label_classification"  # multi-hot rows (batch, labels) for the BCE loss
    labels = (
        torch.randint(0, 2, (micro_batch, num_labels)).float()
        if multi
        else torch.randn(micro_batch, generator=g)
        if task == "text_regression"  # one float target per example
        else torch.randint(0, num_labels, (micro_batch,))
    )
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _warm_up(device: torch.device, precision: Any, t: Any) -> None:
    """One tiny transformer step, stepped as the training steps (`t`: the TrainingConfig; lean mode's bf16 weights,
    its optimizer and the step fused into backward): kernels, threads, autocast and the optimizer's one-off state
    (BF16AdamW's scratch and random-bit buffers) get set up outside the measurement."""

    lean = t.memory == "lean"
    warm = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).to(device, torch.bfloat16 if lean else None)
    optimizer = build_optimizer([{"params": list(warm.parameters())}], t, device, lean=lean)
    fused = attach_fused_step(warm, optimizer, per_param_max_norm=t.max_grad_norm) if fuses_step(t, optimizer) else None
    with precision.autocast():
        warm(torch.randn(2, 8, 32, device=device, dtype=torch.bfloat16 if lean else None)).float().sum().backward()
    if fused is None:
        optimizer_step(warm, optimizer, None, t.max_grad_norm)
    else:
        fused.remove()


@contextlib.contextmanager
def _building_on(device: torch.device, lean: bool) -> Any:
    """On CUDA, the model's tensors are created on the GPU as it is built, in bf16 for lean mode: a random 8B model
    never passes through host memory in fp32 (the steps' peak is measured after building, so this changes no
    figure). Elsewhere nothing changes."""
    if device.type != "cuda":
        yield
        return
    dtype = torch.get_default_dtype()
    if lean:
        torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(dtype)


def dry_run(
    cfg: Config, task: str, labels: list[str] | None, facts: Facts, device: torch.device, steps: int = 2
) -> dict[str, Any]:
    """Peak memory of `steps` optimizer steps of the configured training on random inputs, the model prepared and
    stepped by the trainer's own functions. CUDA: torch.cuda.max_memory_allocated. CPU: the peak RSS during the
    steps over the RSS after building model and optimizer and a one-sample forward and backward, the growth of
    shared libraries' pages left out (`_library_pages`), plus the weights' bytes (part of that baseline, so counted,
    not measured)."""

    t, precision, task_fns = (
        cfg.training,
        resolve_precision(cfg.hardware.mixed_precision, device),
        task_record(cfg, task),
    )
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    _warm_up(device, precision, t)
    seed_everything(t.seed)
    # Measured under glibc's own allocator (the speed plan's cpu_allocator off): the peak of what the steps hold,
    # not what a heap that keeps freed blocks has left over.
    with _building_on(device, t.memory == "lean"):
        model, plan, _ = prepare(replace(cfg, speed=replace(cfg.speed, cpu_allocator="off")), task, labels, device)
    optimizer = build_optimizer(param_groups(model, plan, cfg), t, device, lean=t.memory == "lean")
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    batch = {k: v.to(device) for k, v in _random_batch(task, facts, cfg.data.batch_size, len(labels or "ab")).items()}
    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for x in tensors:  # fault in weights that from_pretrained left memory-mapped, so the baseline holds them
            x.sum()
    weights = sum(x.numel() * x.element_size() for x in tensors)
    micro_steps = min(t.gradient_accumulation_steps, 2)  # a third micro-batch adds no memory
    model.train()
    # A forward and backward of one sample, gradients dropped, before the baseline: the kernels' code pages (which a
    # forked process faults in anew, more or fewer by CPU: oneDNN's JIT kernels differ between AVX2 and AVX-512) and
    # one-off caches are then outside the measurement, which keeps what the steps' tensors add.
    with precision.autocast():
        task_fns.loss(model, {k: v[:1] for k, v in batch.items()}, t.label_smoothing)[0].backward()
    optimizer.zero_grad(set_to_none=True)
    # Lean mode steps inside backward as the trainer does (attached after the warm-up, which must not step).
    fused = (
        attach_fused_step(model, optimizer, per_param_max_norm=t.max_grad_norm) if fuses_step(t, optimizer) else None
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset, base = (_reset_peak_rss(), _rss()[0] - _library_pages()) if device.type != "cuda" else (True, 0)
    seconds = []
    for _ in range(steps):  # the trainer's sequence: micro-steps, then clip, step and zero_grad
        began = time.perf_counter()
        for _ in range(micro_steps):
            with precision.autocast():
                loss_sum, _logits = task_fns.loss(model, batch, t.label_smoothing)  # the loop keeps logits too
                loss = loss_sum / (task_fns.count(batch) * micro_steps)
            (scaler.scale(loss) if scaler else loss).backward()
        if fused is None:
            optimizer_step(model, optimizer, scaler, t.max_grad_norm)
        del loss_sum, _logits, loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
    if device.type == "cuda":
        return {
            "measured": torch.cuda.max_memory_allocated(device),
            "step_seconds": seconds[-1],
            "how": "torch.cuda.max_memory_allocated",
        }
    how = (
        "CPU: peak RSS over the RSS after building and a one-sample warm-up, libraries' code pages left out, + the "
        "weights"
        if reset
        else "CPU: peak RSS of the process"
    )
    return {"measured": _rss()[1] - _library_pages() - base + weights, "step_seconds": seconds[-1], "how": how}


def _in_fork(job: dict[str, Any]) -> dict[str, Any]:
    """One dry run in a forked copy of the server: a fresh heap and RSS counter per method. The server has only
    imported libraries and built meta models, so no OpenMP thread pool is copied half-alive into the children."""

    def run() -> dict[str, Any]:
        try:
            return dry_run(
                config_from_dict(job["config"]),
                job["task"],
                job["labels"],
                Facts(**job["facts"]),
                torch.device(job["device"]),
            )
        except Exception as err:  # becomes the method's note; the other methods are still measured
            return {"error": f"dry run failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}

    if job["device"].startswith("cuda") or not hasattr(os, "fork"):
        # CUDA does not survive a fork once initialised; its allocator's counters keep the methods apart anyway.
        result = run()
        gc.collect()
        return result
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, json.dumps(run()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": f"dry run process died ({status=}; out of memory?)"}


def serve() -> None:
    """The dry-run process: jobs as JSON on stdin, a JSON list of results on stdout's last line."""
    import transformers

    jobs = json.loads(sys.stdin.read())
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Import here, once, what each child would import again (seconds each: torch._dynamo with the optimizer, model
    # code, peft): building an optimizer and meta models runs no kernel, so forking afterwards stays safe.
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    for job in jobs:
        inspect_model(config_from_dict(job["config"]), job["task"], job["labels"])
    print(json.dumps([_in_fork(job) for job in jobs]), flush=True)


def dry_runs(
    jobs: list[tuple[Config, str, list[str] | None, Facts, str]], timeout: float = 1800
) -> list[dict[str, Any]]:
    """`dry_run` of each (config, task, labels, facts, device), each in a process forked from one clean server."""
    payload = [
        {"config": to_dict(cfg), "task": task, "labels": labels, "facts": asdict(facts), "device": device}
        for cfg, task, labels, facts, device in jobs
    ]
    env = dict(os.environ)
    # A fixed glibc mmap threshold gives each freed tensor back to the OS at once: the peak RSS is then the peak of
    # live memory (as CUDA's max_memory_allocated), not of what the default, self-raising threshold keeps cached.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if x
    )
    cmd = [sys.executable, "-c", "from fulltune.planning.dryrun import serve; serve()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"dry runs timed out after {timeout:.0f} s"}] * len(jobs)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [
            {"error": "dry run failed: " + (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        ] * len(jobs)
    return json.loads(lines[-1])
