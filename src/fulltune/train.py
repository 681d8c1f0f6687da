"""The training loop: micro-batches, accumulation, clipping, optimizer step, logging, evaluation, checkpoints.

One readable loop; features are plain `if` branches. The only host syncs are at log, eval and save points.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune import checkpoint as ckpt
from fulltune import distributed as ddist
from fulltune.config import Config, save_config
from fulltune.data.sampler import ResumableBatchSampler
from fulltune.evaluate import classification_metrics, lm_metrics
from fulltune.methods import (
    LORA_METHODS,
    apply_trainable,
    describe_groups,
    enable_gradient_checkpointing,
    master_weights,
    param_groups,
    plan_method,
    wrap_lora,
)
from fulltune.models import build_model, count_parameters, load_exported
from fulltune.optim import build_optimizer, lr_factor, set_lr, warmup_steps
from fulltune.report import RunLogger
from fulltune.runtime import (
    barrier,
    cpu_has_fast_bf16,
    is_main,
    peak_memory_bytes,
    rank,
    resolve_device,
    resolve_precision,
    seed_everything,
    world_size,
)
from fulltune.tasks import TASKS, infer_task, read_labels
from fulltune.train_metrics import TrainAccuracy, log_train_accuracy


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the message says where and which checkpoint is the last good one."""


@dataclass
class Run:
    """Everything a training run is made of, built once by `setup`."""

    cfg: Config
    task_name: str
    bundle: Any
    model: nn.Module
    data: Any
    plan: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    sampler: ResumableBatchSampler
    device: torch.device
    precision: Any
    state: ckpt.TrainState
    steps_per_epoch: int
    batches_per_epoch: int
    param_names: list[str]
    fused: Any = None
    """lean mode's FusedStepHandle when the optimizer step runs inside backward, else None."""


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def setup(cfg: Config, resume: str | None = None) -> Run:
    device = resolve_device(cfg.hardware.device)
    distributed = ddist.init_distributed(cfg, device)
    ddist.check_supported(cfg)
    precision = resolve_precision(cfg.hardware.mixed_precision, device)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    t = cfg.training
    # Check --resume before any slow work, so a wrong path fails at once.
    point = ckpt.find_resume_point(resume, Path(cfg.output_dir)) if resume else None
    seed_everything(t.seed)
    task_name = infer_task(cfg)
    task = TASKS[task_name]
    labels, raw = read_labels(cfg, task_name)
    bundle = build_model(cfg, task_name, labels)
    model = bundle.model
    lean = t.memory == "lean"
    if t.gradient_checkpointing or lean:
        enable_gradient_checkpointing(model)
    if cfg.method.name in LORA_METHODS:
        model = wrap_lora(model, cfg, task_name)
    if lean:
        model.to(torch.bfloat16)
    model.to(device)
    data = task.build_data(cfg, bundle, labels, raw)
    plan = plan_method(model, cfg)
    master_weights(model, plan, cfg)  # fp32 where standard mode trains (model.torch_dtype may load bf16)
    # Under torchrun without a parallel mode, plain DDP is the sensible default.
    parallel = (t.parallel if t.parallel != "none" else "ddp") if distributed else "none"
    if parallel == "fsdp":
        # FSDP2 replaces parameters by sharded DTensors: shard first, then hand them to the optimizer.
        model = ddist.wrap_model(model, cfg, device, plan.lmap.block_prefixes, precision)
    groups = param_groups(model, plan, cfg)
    optimizer = build_optimizer(groups, t, device, lean=lean, fused=parallel != "fsdp")
    if parallel == "ddp":
        apply_trainable(model, plan.trainable_at(0))  # DDP all-reduces what requires grad at construction
        model = ddist.wrap_model(model, cfg, device, plan.lmap.block_prefixes, precision)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    sampler = ResumableBatchSampler(
        len(data.train),
        cfg.data.batch_size,
        seed=t.seed,
        shuffle=True,
        lengths=data.lengths,
        group_by_length=cfg.data.group_by_length,
        with_seeds=data.with_seeds,
        rank=rank(),
        world_size=world_size(),
    )
    batches_per_epoch = len(sampler)
    if batches_per_epoch == 0:
        raise TrainingError(f"the training set ({len(data.train)} examples) gives no batch on each of {world_size()} ranks")
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    total = steps_per_epoch * t.num_epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps) if t.num_epochs else t.max_steps
    state = ckpt.TrainState(total_steps=total, micro_batch_size=cfg.data.batch_size, world_size=world_size())
    if point is not None:
        state = ckpt.load_checkpoint(point, model, optimizer, scaler)
        state.total_steps = total
        state.batches_done = _convert_position(state, cfg.data.batch_size, world_size(), point)
        print(f"resumed from {point} at optimizer step {state.optimizer_step} (epoch {state.epoch}, batch {state.batches_done})")
    param_names = [n for g in groups for n in g["names"]]
    run = Run(cfg, task_name, bundle, model, data, plan, optimizer, scaler, sampler, device, precision, state,
              steps_per_epoch, batches_per_epoch, param_names)
    fusable = callable(getattr(optimizer, "step_param", None))  # BF16AdamW; bitsandbytes' 8-bit AdamW is not
    if lean and fusable and t.lean_fused_step and parallel == "none" and t.gradient_accumulation_steps == 1:
        attach_fused(run)
    if t.compile:
        run.model = torch.compile(run.model)
    return run


def attach_fused(run: Run) -> None:
    """(Re)hook lean mode's in-backward optimizer step onto the parameters that train now."""
    from fulltune.lean import attach_fused_step

    if run.fused is not None:
        run.fused.remove()
    # Global-norm clipping needs every gradient before the first update: clip each tensor's norm instead.
    run.fused = attach_fused_step(ckpt.unwrap(run.model), run.optimizer, per_param_max_norm=run.cfg.training.max_grad_norm)


def _lean_note(run: Run) -> str:
    t = run.cfg.training
    if t.memory != "lean":
        return ""
    how = (f"bf16 weights, AdamW moments {t.lean_state_dtype}, {t.lean_rounding} rounding, gradient checkpointing"
           if t.lean_optimizer == "bf16_adamw" else "bf16 weights, bitsandbytes 8-bit AdamW, gradient checkpointing")
    if run.device.type == "cpu" and not cpu_has_fast_bf16():
        how += " (this CPU has no bf16 units: bf16 matmuls are emulated and several times slower than fp32)"
    if run.fused is not None:
        clip = f"; max_grad_norm {t.max_grad_norm} clips each tensor's gradient" if t.max_grad_norm else ""
        return f"memory lean: {how}, optimizer step fused into backward{clip}\n"
    if t.lean_optimizer == "adamw8bit":
        why = "the 8-bit optimizer has no per-tensor step"
    elif t.gradient_accumulation_steps > 1 or world_size() > 1:
        why = "gradient accumulation and data parallelism need whole gradients"
    else:
        why = "training.lean_fused_step=false"
    return f"memory lean: {how}; optimizer step after backward ({why})\n"


def _convert_position(state: ckpt.TrainState, micro: int, world: int, point: Path) -> int:
    """Batches already done this epoch, in this run's batch size and world size (the global batch must match)."""
    saved_micro, saved_world = state.micro_batch_size or micro, state.world_size or 1
    if saved_micro * saved_world != micro * world:
        raise TrainingError(
            f"checkpoint '{point}' was written with a global batch of {saved_micro} x {saved_world} processes; "
            f"this run has {micro} x {world}: set data.batch_size so that the global batch is the same"
        )
    state.micro_batch_size, state.world_size = micro, world
    return state.batches_done


def make_loader(run: Run, dataset: Any, batch_sampler: Any = None, batch_size: int | None = None) -> torch.utils.data.DataLoader:
    workers = run.data.num_workers
    kwargs: dict[str, Any] = dict(
        collate_fn=run.data.collate,
        num_workers=workers,
        pin_memory=run.device.type == "cuda",
        # A private generator: worker seeding must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(run.cfg.training.seed),
    )
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        kwargs["persistent_workers"] = False
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


def evaluate_split(run: Run, dataset: Any, model: nn.Module | None = None) -> dict[str, Any]:
    model = model if model is not None else run.model
    bs = run.cfg.data.eval_batch_size or 2 * run.cfg.data.batch_size
    loader = make_loader(run, dataset, batch_size=bs)
    if run.task_name == "causal_lm":
        metrics = lm_metrics(model, loader, run.device, run.precision)
    else:
        metrics = classification_metrics(model, loader, len(run.data.labels), run.device, run.precision)
    run.model.train()
    return metrics


def _metric_name(run: Run) -> tuple[str, bool]:
    task = TASKS[run.task_name]
    name = run.cfg.training.metric
    if name == "auto":
        return task.default_metric, task.higher_is_better
    return name, name not in ("loss", "perplexity")


def _meta(run: Run, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    trainable, total = count_parameters(run.model)
    info = {"optimizer_step": run.state.optimizer_step, "epoch": run.state.epoch, "trainable_parameters": trainable, "total_parameters": total}
    info.update(extra or {})
    return ckpt.run_meta(run.task_name, run.data.labels, run.cfg, info)


def _sync_context(model: nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce on accumulation micro-steps (DDP/FSDP)."""
    if ddist.is_fsdp(model):
        model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    if not last_micro and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _optimizer_step(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Clip the global gradient norm (unscaled first under fp16), step, and free the gradients."""
    t = run.cfg.training
    if t.max_grad_norm is not None:
        if run.scaler:
            run.scaler.unscale_(optimizer)
        grads = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, t.max_grad_norm, foreach=True)
    if run.scaler:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train as configured; return a summary (final validation/test metrics, timings, paths)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = setup(cfg, resume)
    t, state, model, optimizer = cfg.training, run.state, run.model, run.optimizer
    task = TASKS[run.task_name]
    metric_name, higher = _metric_name(run)
    log = RunLogger(cfg, out, enabled=is_main())
    if is_main():
        save_config(cfg, out / "config.yaml")
        (out / "labels.json").write_text(json.dumps(run.data.labels))
    trainable_all = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    _, total_params = count_parameters(model)
    global_batch = cfg.data.batch_size * t.gradient_accumulation_steps * world_size()
    log.info(
        f"task {run.task_name} | method {cfg.method.name} | {len(run.data.train)} train examples"
        + (f", {len(run.data.val)} val" if run.data.val is not None else "")
        + f" | device {run.device} | precision {run.precision.name}{run.precision.note}\n"
        f"global batch {global_batch} = micro-batch {cfg.data.batch_size} x accumulation {t.gradient_accumulation_steps}"
        f" x world size {world_size()} | {run.steps_per_epoch} optimizer steps per epoch, {state.total_steps} in all\n"
        f"parameters that train: {trainable_all:,} of {total_params:,} ({100 * trainable_all / total_params:.2f}%)\n"
        + _lean_note(run)
        + describe_groups(optimizer.param_groups, t.base_learning_rate)
    )
    for skipped in run.data.info.get("skipped_images", []):
        log.info(f"skipped unreadable image: {skipped}")
    warm = warmup_steps(t, state.total_steps)
    loader = make_loader(run, run.data.train, batch_sampler=run.sampler)
    accum = t.gradient_accumulation_steps
    model.train()
    log.start_progress(state.total_steps, state.optimizer_step)
    pending: list[tuple[int, torch.Tensor]] = []  # (optimizer step, loss of that step) since the last log
    last_good = None
    tic, samples_at_tic = time.perf_counter(), state.samples_seen
    # Time spent outside optimisation (evaluation, checkpoints) is subtracted for the training throughput.
    loop_start, samples_at_start, side_time = time.perf_counter(), state.samples_seen, 0.0
    stop = False
    train_acc = TrainAccuracy(run.task_name, run.device)  # issue 13: training accuracy per epoch

    def check_finite() -> None:
        """One host sync: flush the losses since the last check; stop at the first non-finite one."""
        nonlocal pending
        if not pending:
            return
        values = ddist.mean_over_ranks(torch.stack([v for _, v in pending])).tolist()
        if run.fused is not None and run.fused.nonfinite() and all(math.isfinite(v) for v in values):
            values[-1] = math.nan  # a NaN/inf gradient already went into the weights: report it like a NaN loss
        for (step, _), v in zip(pending, values, strict=True):
            if not math.isfinite(v):
                where = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written before it"
                raise TrainingError(f"loss became {v} at optimizer step {step} (epoch {state.epoch}){where}")
        log.loss_values(pending[-1][0], values)
        pending = []

    def save(path: Path) -> None:
        nonlocal last_good, side_time
        check_finite()
        began = time.perf_counter()
        # Under FSDP, gathering full states is a collective: every rank joins, rank 0 writes.
        full_model = ddist.full_model_state(model)
        full_optim = ddist.full_optimizer_state(model, optimizer) if full_model is not None else None
        if is_main():
            ckpt.save_checkpoint(path, model, run.bundle, optimizer, run.scaler, state, cfg, _meta(run),
                                 model_state=full_model, optimizer_state=full_optim, param_names=run.param_names)
            ckpt.prune_checkpoints(out, cfg.checkpoint.keep_last)
        barrier()
        last_good = path
        side_time += time.perf_counter() - began

    def evaluate_and_track() -> bool:
        """Validation metrics, best/ and early stopping; True when training should stop."""
        nonlocal side_time
        if run.data.val is None:
            return False
        check_finite()
        began = time.perf_counter()
        metrics = evaluate_split(run, run.data.val)
        value = metrics[metric_name]
        improved = state.best_metric is None or (
            value > state.best_metric + t.early_stopping.min_delta if higher else value < state.best_metric - t.early_stopping.min_delta
        )
        if improved:
            state.best_metric, state.best_step = value, state.optimizer_step
            state.evals_without_improvement = 0
            full_model = ddist.full_model_state(model) if cfg.checkpoint.save_best else None
            if cfg.checkpoint.save_best and is_main():
                ckpt.save_checkpoint(out / "best", model, run.bundle, None, None, state, cfg,
                                     _meta(run, {"val_metrics": _brief(metrics)}), model_state=full_model)
        else:
            state.evals_without_improvement += 1
        epoch_no = state.epoch if state.batches_done == 0 else state.epoch + 1  # 1-based: the epoch just trained
        state.history.append({"step": state.optimizer_step, "epoch": epoch_no, **_brief(metrics)})
        log.eval(state.optimizer_step, epoch_no, metrics, metric_name, improved)
        side_time += time.perf_counter() - began
        return t.early_stopping.enabled and state.evals_without_improvement >= t.early_stopping.patience

    for epoch in range(state.epoch, t.num_epochs):
        if state.optimizer_step >= state.total_steps or stop:
            break
        state.epoch = epoch
        trainable = run.plan.trainable_at(epoch)
        if trainable != {n for n, p in ckpt.unwrap(model).named_parameters() if p.requires_grad}:
            apply_trainable(ckpt.unwrap(model), trainable)
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                model = run.model = ddist.rewrap_ddp(model, run.device)
            if run.fused is not None:
                attach_fused(run)
        run.sampler.set_epoch(epoch, state.batches_done)
        batches = iter(loader)
        while state.batches_done < run.batches_per_epoch and state.optimizer_step < state.total_steps:
            n = min(accum, run.batches_per_epoch - state.batches_done)
            micro = [next(batches) for _ in range(n)]
            # Average over every example (token) of the whole accumulation window, so N micro-batches of B
            # give exactly the update of one batch of N*B, even when the last micro-batch is short.
            count = sum(task.count(b) for b in micro)
            step_loss = torch.zeros((), device=run.device)
            set_lr(optimizer, t.base_learning_rate, lr_factor(state.optimizer_step, state.total_steps, warm, t.lr_scheduler, t.min_lr_ratio))
            for i, batch in enumerate(micro):
                batch = _to_device(batch, run.device)
                with _sync_context(model, i == n - 1), run.precision.autocast():
                    loss_sum, logits = task.loss(model, batch, t.label_smoothing)
                    loss = loss_sum / count
                train_acc.update(logits, batch)
                (run.scaler.scale(loss) if run.scaler else loss).backward()
                step_loss += loss.detach()
            if run.fused is None:  # (fused lean mode updated every tensor, and freed its gradient, in backward)
                _optimizer_step(run, model, optimizer)
            state.optimizer_step += 1
            state.batches_done += n
            state.micro_step += n
            state.samples_seen += sum(int(b["labels"].shape[0]) for b in micro) * world_size()
            pending.append((state.optimizer_step, step_loss))
            log.advance(epoch, state)
            if state.optimizer_step % cfg.logging.log_every_steps == 0:
                check_finite()
                now = time.perf_counter()
                log.scalars(state.optimizer_step, optimizer, (state.samples_seen - samples_at_tic) / max(now - tic, 1e-9), peak_memory_bytes(run.device))
                tic, samples_at_tic = now, state.samples_seen
            if cfg.checkpoint.save_every_steps and state.optimizer_step % cfg.checkpoint.save_every_steps == 0:
                save(out / f"checkpoint-step-{state.optimizer_step}")
            if t.eval_every_steps and state.optimizer_step % t.eval_every_steps == 0 and evaluate_and_track():
                stop = True
                break
        if state.batches_done >= run.batches_per_epoch:
            state.epoch, state.batches_done = epoch + 1, 0
        check_finite()
        log_train_accuracy(log, state, train_acc.take())
        if not stop and not t.eval_every_steps:
            stop = evaluate_and_track()
        every = cfg.checkpoint.save_every_epochs
        finished = stop or state.optimizer_step >= state.total_steps
        if every and (state.epoch % every == 0 or finished):
            # A run that ends mid-epoch (max_steps) still leaves a resumable checkpoint at its last step.
            name = f"checkpoint-epoch-{state.epoch}" if state.batches_done == 0 else f"checkpoint-step-{state.optimizer_step}"
            if last_good is None or last_good.name != name:
                save(out / name)
        if stop:
            log.info(f"early stopping: no improvement of val {metric_name} for {state.evals_without_improvement} evaluations")
    check_finite()
    log.close_progress()
    summary: dict[str, Any] = {
        "task": run.task_name,
        "method": cfg.method.name,
        "optimizer_steps": state.optimizer_step,
        "epochs_done": state.epoch,
        "best_val": {metric_name: state.best_metric, "step": state.best_step},
        "trainable_parameters": trainable_all,
        "total_parameters": total_params,
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "output_dir": str(out),
        "last_checkpoint": str(last_good) if last_good else None,
    }
    summary.update(log.summary())
    train_time = max(time.perf_counter() - loop_start - side_time, 1e-9)
    summary["train_time_s"] = train_time
    summary["train_samples_per_s"] = (state.samples_seen - samples_at_start) / train_time
    barrier()
    if run.data.test is not None:
        # Test metrics come from best/ (chosen on validation) when there is one, else from the final weights
        # (on every rank then: a sharded model's forward is collective).
        if run.data.val is not None and (out / "best").is_dir():
            if is_main():
                best = load_exported(out / "best", run.device).model
                summary["test"] = _brief(evaluate_split(run, run.data.test, best)) | {"weights": "best"}
        else:
            summary["test"] = _brief(evaluate_split(run, run.data.test)) | {"weights": "final"}
    if is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: " + json.dumps({k: summary[k] for k in ("optimizer_steps", "best_val")} | ({"test": summary["test"]} if "test" in summary else {})))
    log.close()
    return summary


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics only (no matrices), for logs and summaries."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

