"""The training recipe: set up once (model, data, optimizer, state), then the loop of micro-batches,
accumulation, clipping, optimizer step, logging, evaluation and checkpoints.

`Trainer.train` reads as a table of contents; each step of it is one method, with the run's state on the object.
Features are plain `if` branches, no callbacks. The only host syncs are at log, eval and save points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import Config, save_config
from fulltune.data.multilabel import read_thresholds
from fulltune.data.records import TaskData
from fulltune.data.sampler import ResumableBatchSampler
from fulltune.data.text import run_inputs
from fulltune.errors import Interrupted, TrainingError
from fulltune.eval.metrics import (
    classification_metrics,
    improves,
    multi_label_metrics,
    multi_label_scores,
    regression_metrics,
    scalar_metrics,
    token_metrics,
    tune_thresholds,
)
from fulltune.eval.perplexity import block_perplexity
from fulltune.files.rundir import abandon_run_dir, claim_output_dir, release_run_lock, write_atomic
from fulltune.model.build import check_vocabulary
from fulltune.model.bundle import ModelBundle, count_parameters
from fulltune.model.exported import load_exported
from fulltune.model.prepare import prepare_model
from fulltune.model.trainable import TrainablePlan, apply_trainable, param_groups, unfreeze_counts, unfrozen_at
from fulltune.report.logger import RunLogger, Throughput, done_line
from fulltune.runtime import distributed as ddist
from fulltune.runtime.device import Precision, check_hardware, resolve_device, resolve_precision, to_device, unwrap
from fulltune.runtime.memory import peak_memory_bytes
from fulltune.runtime.ranks import barrier, is_main, rank, world_size
from fulltune.runtime.rng import seed_everything
from fulltune.runtime.stop import StopRequests
from fulltune.speed.plan import Applied
from fulltune.state import checkpoint as ckpt
from fulltune.state.checkpoint import save_fsdp_checkpoint
from fulltune.state.modelcard import card_facts, refresh_with_test
from fulltune.state.resume import check_resume, data_fingerprint
from fulltune.training.accuracy import TrainAccuracy, log_train_accuracy
from fulltune.training.header import run_header, run_summary
from fulltune.training.lean_fused import attach_fused_step, fuses_step
from fulltune.training.optim import build_optimizer, group_lrs, lr_factor, optimizer_step, set_lr, warmup_steps
from fulltune.training.tasks import Task, data_loader, infer_task, read_labels, task_record, validation_metric


class Trainer:
    """One training run. `setup()` builds everything (and restores a checkpoint with `resume`); `train()` runs.

    Tests and tools call `setup()` alone to get the model, data and optimizer exactly as training uses them.
    """

    cfg: Config
    device: torch.device
    precision: Precision
    parallel: str
    task_name: str
    task: Task
    bundle: ModelBundle
    model: nn.Module
    plan: TrainablePlan
    speed: Applied
    data: TaskData
    sampler: ResumableBatchSampler | Any
    batches_per_epoch: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    param_names: list[str]
    state: ckpt.TrainState
    log: RunLogger

    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False) -> None:
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.out = Path(cfg.output_dir)
        self.fused: Any = None
        """lean mode's FusedStepHandle when the optimizer step runs inside backward, else None."""
        self.pending: list[tuple[int, torch.Tensor]] = []
        """(optimizer step, loss of that step) since the last finite check: checked together, one host sync."""
        self.last_grad_norm: torch.Tensor | None = None
        self.last_good: Path | None = None
        """The newest checkpoint written by this process."""
        self.last_good_step: int | None = None
        """The optimizer step that checkpoint (or the one resumed from) holds."""
        self.stop = StopRequests()
        """SIGINT / SIGTERM: installed while `train()` runs."""
        self.thresholds: list[float] | None = None
        """Multi-label with eval.tune_thresholds: the per-label thresholds tuned at the latest evaluation."""

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        self._setup_runtime()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        self._setup_state()
        self._setup_step()
        return self

    def _setup_runtime(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.hardware.device)
        distributed = ddist.init_distributed(cfg, self.device)
        ddist.check_supported(cfg)
        self.precision = resolve_precision(cfg.hardware.mixed_precision, self.device)
        parallel = cfg.training.parallel  # under torchrun without a parallel mode, plain DDP is the sensible default
        self.parallel = (parallel if parallel != "none" else "ddp") if distributed else "none"
        self.resume_point = ckpt.find_resume_point(self.resume, self.out) if self.resume else None  # before slow work
        seed_everything(cfg.training.seed)

    def _setup_model(self) -> None:
        self.task_name = infer_task(self.cfg)
        self.task = task_record(self.cfg, self.task_name)
        self._labels, self._raw = read_labels(self.cfg, self.task_name)
        self.bundle, self.model, self.plan = prepare_model(self.cfg, self.task_name, self._labels, self.device)
        check_vocabulary(self.cfg, self.bundle)  # (plan prices such a model; only training would index past it)
        self.speed = self.bundle.speed  # the speed choices as applied (threads and allocator too), the heap trimmer

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.data = self.task.build_data(cfg, self.bundle, self._labels, self._raw)
        self.sampler = self.data.sampler or ResumableBatchSampler(  # (a stream brings its own order)
            len(self.data.train),
            cfg.data.batch_size,
            seed=cfg.training.seed,
            shuffle=True,
            lengths=self.data.lengths,
            group_by_length=cfg.data.group_by_length,
            with_seeds=self.data.with_seeds,
            rank=rank(),
            world_size=world_size(),
        )
        self.batches_per_epoch = len(self.sampler)
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"the training set ({len(self.data.train)} examples) gives no batch on each of {world_size()} ranks"
            )
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.training.gradient_accumulation_steps)

    def _setup_optimizer(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        block_prefixes = self.plan.lmap.block_prefixes
        if self.parallel == "fsdp":
            # FSDP2 replaces parameters by sharded DTensors: shard first, then hand them to the optimizer.
            self.model = ddist.wrap_model(self.model, cfg, self.device, block_prefixes, self.precision)
        groups = param_groups(self.model, self.plan, cfg)
        self.param_names = [n for g in groups for n in g["names"]]
        self.optimizer = build_optimizer(groups, t, self.device, lean=t.memory == "lean", fused=self.parallel != "fsdp")
        if self.parallel == "ddp":
            apply_trainable(self.model, self.plan.trainable_at(0))  # DDP all-reduces what requires grad when built
            probe = (self.task.loss, to_device(self.data.collate([self.data.train[0]]), self.device))  # one example
            self.model = ddist.wrap_model(self.model, cfg, self.device, block_prefixes, self.precision, probe)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.needs_scaler else None

    def _setup_state(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        total = self.steps_per_epoch * t.num_epochs
        if t.max_steps is not None:
            total = min(total, t.max_steps) if t.num_epochs else t.max_steps
        self.state = ckpt.TrainState(total_steps=total, micro_batch_size=cfg.data.batch_size, world_size=world_size())
        self.state.data, point, self.changed = data_fingerprint(cfg), self.resume_point, []
        if point is None:
            return
        data, self.state = self.state.data, ckpt.load_checkpoint(point, self.model, self.optimizer, self.scaler)
        self.changed = check_resume(point, self.state.data, data, cfg)  # other data refused; changed settings said
        self.state.total_steps, self.state.data = total, data
        self.thresholds = ckpt.read_run_meta(point).get("thresholds")  # (multi-label: tuned at the last evaluation)
        self.last_good_step = self.state.optimizer_step  # (a stop before the next step has nothing new to save)
        if self.state.best_loss is None:  # a checkpoint older than the tie-break: the loss its history holds
            at_best = [h.get("loss") for h in self.state.history if h.get("step") == self.state.best_step]
            self.state.best_loss = at_best[-1] if at_best else None
        self.state.batches_done = ckpt.convert_position(self.state, cfg.data.batch_size, world_size(), point)

    def _setup_step(self) -> None:
        """Lean mode fuses the optimizer step into backward where it can; `training.compile` compiles the model."""
        t = self.cfg.training
        if fuses_step(t, self.optimizer, self.parallel):
            self._attach_fused()
        if t.compile:
            self.model = torch.compile(self.model)

    def _attach_fused(self) -> None:
        """(Re)hook lean mode's in-backward optimizer step onto the parameters that train now."""

        if self.fused is not None:
            self.fused.remove()
        # Global-norm clipping needs every gradient before the first update: clip each tensor's norm instead.
        self.fused = attach_fused_step(
            unwrap(self.model), self.optimizer, per_param_max_norm=self.cfg.training.max_grad_norm
        )

    # ------------------------------------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        check_hardware(self.cfg)
        claim = claim_output_dir(self.out, self.resume, self.overwrite, inputs=run_inputs(self.cfg))  # locked till done
        try:
            with StopRequests() as self.stop:
                try:
                    self.setup()
                except BaseException:
                    abandon_run_dir(claim)  # a run that fails before it starts (a bad column, say) leaves nothing
                    raise
                self._start()
                self._train_epochs()
                self.stop.armed = False  # training is over: a signal now stops at once
                if is_main():  # a kill between the last save and its clean-up leaves one checkpoint beyond keep_last
                    ckpt.delete_old_checkpoints(self.out, self.cfg.checkpoint.keep_last)
                self._check_finite()
                self.log.close_progress()
                summary = self._summary()
                self.log.close()
                if is_main():
                    refresh_with_test(self.out)  # the test metrics join the card of the weights they measured
        except Interrupted as err:
            err.resumable = bool(ckpt.list_checkpoints(self.out))
            raise
        return summary

    def _train_epochs(self) -> None:
        # One process stops at a step boundary with a checkpoint; several would have to agree on the step first.
        if world_size() == 1:
            self.stop.arm()
        stop = False
        for epoch in range(self.state.epoch, self.cfg.training.num_epochs):
            # A resume from the last step of an epoch still finishes that epoch (its evaluation and checkpoint).
            if stop or (self.state.optimizer_step >= self.state.total_steps and self.state.batches_done == 0):
                break
            stop = self._end_epoch(epoch, self._train_epoch(epoch))

    def _start(self) -> None:
        """Open the log, write config.yaml and labels.json, and say what is about to run."""
        cfg, t, s = self.cfg, self.cfg.training, self.state
        self.metric_name, self.higher_is_better = validation_metric(cfg, self.task)
        self.log = RunLogger(cfg, self.out, enabled=is_main())
        self._apply_unfreeze(s.epoch)  # what trains now, before the start is recorded with its parameter count
        # train.log, run_history.jsonl and the report say where this run starts (the checkpoint resumed from)
        self.log.started(self, str(self.resume_point or self.resume or ""))
        if is_main():
            save_config(cfg, self.out / "config.yaml")
            (self.out / "labels.json").write_text(json.dumps(self.data.labels))
        self.trainable_params = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        self.total_params = count_parameters(self.model)[1]
        counts = unfreeze_counts(unwrap(self.model), self.plan)  # (the changes within this run's epochs)
        self.unfreeze_counts = {e: n for e, n in counts.items() if e == 0 or e < t.num_epochs}
        self.log.info(run_header(self) + "".join(f"\nchanged since the checkpoint: {c}" for c in self.changed))
        for skipped in self.data.info.get("skipped_images", []):
            self.log.info(f"skipped unreadable image: {skipped}")
        for line in self.data.info.get("caps", []):  # what data.max_samples / max_eval_samples kept
            self.log.info(line)
        self.warmup = warmup_steps(t, s.total_steps)
        self.log.lr_schedule(self.optimizer, self._lrs_at, s.total_steps)
        self.loader = self.make_loader(self.data.train, batch_sampler=self.sampler)
        self.throughput = Throughput(samples_at_start=s.samples_seen)
        self.train_accuracy = TrainAccuracy(self.task_name, self.device)  # per epoch, to watch for overfitting
        self.model.train()
        self.log.start_progress(s.total_steps, s.optimizer_step)

    def _train_epoch(self, epoch: int) -> bool:
        """The optimizer steps left in `epoch`; True when training should stop (early stopping)."""
        s, accum = self.state, self.cfg.training.gradient_accumulation_steps
        s.epoch = epoch
        self._apply_unfreeze(epoch)
        unfrozen = unfrozen_at(self.plan, epoch)
        if unfrozen and s.batches_done == 0:  # (a resume mid-epoch said it in the run it continues)
            now = self.unfreeze_counts[epoch]
            self.log.info(
                f"epoch {epoch + 1} starts: {unfrozen} unfrozen (unfreeze schedule epoch {epoch}): {now:,} of "
                f"{self.total_params:,} parameters train"
            )
        self.sampler.set_epoch(epoch, s.batches_done)
        batches = iter(self.loader)
        while s.batches_done < self.batches_per_epoch and s.optimizer_step < s.total_steps:
            if self.stop.signum is not None:
                self._stop_on_signal()
            n = min(accum, self.batches_per_epoch - s.batches_done)
            self.train_step([next(batches) for _ in range(n)])
            if self._after_step():
                return True
        return False

    def _apply_unfreeze(self, epoch: int) -> None:
        """Progressive unfreezing: set requires_grad for this epoch (DDP and the fused step follow the change)."""
        if not apply_trainable(unwrap(self.model), self.plan.trainable_at(epoch)):
            return
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model = ddist.rewrap_ddp(self.model, self.device)
        if self.fused is not None:
            self._attach_fused()

    def _lrs_at(self, update: int) -> list[float]:
        """Each param group's learning rate for the update at 0-based index `update` (the schedule set_lr follows)."""
        t, s = self.cfg.training, self.state
        factor = lr_factor(update, s.total_steps, self.warmup, t.lr_scheduler, t.min_lr_ratio)
        return group_lrs(self.optimizer, t.base_learning_rate, factor)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> None:
        """One optimizer step over the micro-batches of one accumulation window."""
        t, s, n = self.cfg.training, self.state, len(micro_batches)
        # Average over every example (token) of the whole accumulation window, so N micro-batches of B give
        # exactly the update of one batch of N*B, even when the last micro-batch is short.
        count = sum(self.task.count(b) for b in micro_batches)
        step_loss = torch.zeros((), device=self.device)
        factor = lr_factor(s.optimizer_step, s.total_steps, self.warmup, t.lr_scheduler, t.min_lr_ratio)
        set_lr(self.optimizer, t.base_learning_rate, factor)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            with ddist.sync_context(self.model, i == n - 1), self.precision.autocast():
                loss_sum, logits = self.task.loss(self.model, batch, t.label_smoothing)
                loss = loss_sum / count
            self.train_accuracy.update(logits, batch)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            step_loss += loss.detach()
        if self.fused is None:  # (fused lean mode updated every tensor, and freed its gradient, in backward)
            # an offloaded lean optimizer clips each gradient itself, on the CPU copy (the device's are freed)
            clip = None if t.memory == "lean" and t.lean_offload else t.max_grad_norm
            self.last_grad_norm = optimizer_step(self.model, self.optimizer, self.scaler, clip)
        s.optimizer_step += 1
        s.batches_done += n
        s.samples_seen += sum(int(b["labels"].shape[0]) for b in micro_batches) * world_size()
        self.pending.append((s.optimizer_step, step_loss))
        self.log.advance(s.epoch, s)

    def _after_step(self) -> bool:
        """Log, save and evaluate where this step falls on their intervals; True when training should stop."""
        cfg, s = self.cfg, self.state
        step = s.optimizer_step
        self.speed.trim_heap(step)  # on a CPU: every few steps, free pages go back to the system
        changed = self.speed.watch_threads()  # on a CPU: the thread count follows the other work on its CPUs
        if changed:
            self.log.info(changed)
        if step % cfg.logging.log_every_steps == 0:
            self._check_finite()
            rate = self.throughput.window_rate(s.samples_seen)
            norm = None if self.last_grad_norm is None else float(self.last_grad_norm)
            self.log.scalars(step, self.optimizer, rate, peak_memory_bytes(self.device), grad_norm=norm)
        # Evaluate, then save: the checkpoint holds this step's evaluation, so a resume skips none and best/ matches.
        every = cfg.training.eval_every_steps
        stop = bool(every and step % every == 0 and self.evaluate())
        if cfg.checkpoint.save_every_steps and step % cfg.checkpoint.save_every_steps == 0:
            self.save(self.out / f"checkpoint-step-{step}")
        return stop

    def _end_epoch(self, epoch: int, stop: bool) -> bool:
        """Close the epoch: evaluate (unless evaluating by steps) and write the epoch's checkpoint."""
        cfg, s = self.cfg, self.state
        if s.batches_done >= self.batches_per_epoch:
            s.epoch, s.batches_done = epoch + 1, 0
        self._check_finite()
        log_train_accuracy(self.log, s, self.train_accuracy.take())
        if not stop and not cfg.training.eval_every_steps:
            stop = self.evaluate()
        every = cfg.checkpoint.save_every_epochs
        finished = stop or s.optimizer_step >= s.total_steps
        if every and (s.epoch % every == 0 or finished):
            # A run that ends mid-epoch (max_steps) still leaves a resumable checkpoint at its last step.
            name = f"checkpoint-epoch-{s.epoch}" if s.batches_done == 0 else f"checkpoint-step-{s.optimizer_step}"
            if self.last_good is None or self.last_good.name != name:
                self.save(self.out / name)
        if stop:
            self.log.info(
                f"early stopping: no improvement of val {self.metric_name} for "
                f"{s.evals_without_improvement} evaluations"
            )
        return stop

    def _stop_on_signal(self) -> None:
        """A SIGINT or SIGTERM came: save where the run is (unless the newest checkpoint holds this step), then stop
        with `Interrupted`, as resumable as a run that ended there."""
        s, signal_name = self.state, self.stop.name
        if s.optimizer_step > 0 and self.last_good_step != s.optimizer_step:
            name = f"checkpoint-epoch-{s.epoch}" if s.batches_done == 0 else f"checkpoint-step-{s.optimizer_step}"
            self.save(self.out / name)
        if s.optimizer_step == 0:
            said = f"stopped by {signal_name} before the first optimizer step: nothing to resume"
        else:
            saved = self.last_good or self.resume_point
            said = f"stopped by {signal_name} at optimizer step {s.optimizer_step}; checkpoint: {saved}"
        self.log.info(said)
        self.log.close()
        raise Interrupted(said, self.stop.signum or 0)

    # ------------------------------------------------------------------------------------------------ checks

    def _check_finite(self) -> None:
        """One host sync: flush the losses since the last check; stop at the first non-finite one."""
        if not self.pending:
            return
        values = ddist.mean_over_ranks(torch.stack([v for _, v in self.pending])).tolist()
        if self.fused is not None and self.fused.nonfinite() and all(math.isfinite(v) for v in values):
            values[-1] = math.nan  # a NaN/inf gradient already went into the weights: report it like a NaN loss
        for (step, _), v in zip(self.pending, values, strict=True):
            if not math.isfinite(v):
                good = self.last_good
                where = f"; the last good checkpoint is {good}" if good else "; no checkpoint was written before it"
                raise TrainingError(f"loss became {v} at optimizer step {step} (epoch {self.state.epoch}){where}")
        self.log.loss_values(self.pending[-1][0], values)
        self.pending = []

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, path: Path) -> None:
        """A resumable checkpoint at `path` (atomic); older ones beyond checkpoint.keep_last are deleted."""
        self._check_finite()
        with self.throughput.aside():
            parts = (path, self.model, self.bundle, self.optimizer, self.scaler, self.state, self.cfg, self._meta())
            if ddist.is_fsdp(self.model):  # a collective: every rank writes its shards (or joins the gather)
                save_fsdp_checkpoint(*parts)
            elif is_main():
                ckpt.save_checkpoint(*parts, param_names=self.param_names)
            if is_main():
                ckpt.delete_old_checkpoints(self.out, self.cfg.checkpoint.keep_last)
            barrier()
            self.last_good, self.last_good_step = path, self.state.optimizer_step

    def _save_best(self, metrics: dict[str, Any]) -> None:
        """Export the current weights as best/ (an export, not a resume point)."""
        full_model = ddist.full_model_state(self.model)
        if is_main():
            meta = self._meta({"val_metrics": scalar_metrics(metrics)})
            parts = (self.model, self.bundle, None, None, self.state, self.cfg, meta)  # no optimizer: an export
            ckpt.save_checkpoint(self.out / "best", *parts, model_state=full_model)

    def _meta(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        trainable, total = count_parameters(self.model)
        info = {
            "optimizer_step": self.state.optimizer_step,
            "epoch": self.state.epoch,
            "trainable_parameters": trainable,
            "total_parameters": total,
        }
        info |= card_facts(self.cfg, self.data, self.state)  # data sizes and latest val metrics for the model card
        if self.thresholds is not None:
            info["thresholds"] = self.thresholds
        return ckpt.run_meta(self.task_name, self.data.labels, self.cfg, info | (extra or {}))

    # ------------------------------------------------------------------------------------------------ evaluation

    def make_loader(
        self, dataset: Any, batch_sampler: Any = None, batch_size: int | None = None
    ) -> torch.utils.data.DataLoader:
        return data_loader(self.data, dataset, self.device, self.cfg.training.seed, batch_sampler, batch_size)

    def evaluate_split(
        self, dataset: Any, model: nn.Module | None = None, thresholds: list[float] | None = None
    ) -> dict[str, Any]:
        """Metrics of `model` (default: the model in training) on `dataset`; the training model stays in train mode.
        A multi-label model is scored at `thresholds` (default: eval.threshold for every label)."""
        model = model if model is not None else self.model
        loader = self.make_loader(dataset, batch_size=self.cfg.data.eval_batch_size or 2 * self.cfg.data.batch_size)
        if self.task_name == "causal_lm":
            metrics = block_perplexity(model, loader, self.device, self.precision.autocast)
        elif self.task_name == "multi_label_classification":
            thresholds = thresholds or [self.cfg.eval.threshold] * len(self.data.labels)
            metrics = multi_label_metrics(model, loader, thresholds, self.device, self.precision)
        elif self.task_name == "token_classification":
            metrics = token_metrics(model, loader, self.data.labels, self.device, self.precision)
        elif self.task_name == "text_regression":
            metrics = regression_metrics(model, loader, self.device, self.precision, self.cfg.training.loss)
        else:
            metrics = classification_metrics(model, loader, len(self.data.labels), self.device, self.precision)
        self.model.train()
        return metrics

    def evaluate(self) -> bool:
        """Validation metrics, best/ and early stopping; True when training should stop."""
        if self.data.val is None:
            return False
        self._check_finite()
        s, stopping = self.state, self.cfg.training.early_stopping
        if s.history and s.history[-1].get("step") == s.optimizer_step:
            # The checkpoint resumed from holds this step's evaluation (a resume that now evaluates per epoch
            # where the run evaluated every N steps): its row, best/ and patience stand; one row per step.
            return stopping.enabled and s.evals_without_improvement >= stopping.patience
        with self.throughput.aside():
            metrics = self.evaluate_split(self.data.val)
            if self.task_name == "multi_label_classification" and self.cfg.eval.tune_thresholds:
                # Tuned on this validation pass and kept with its weights; best/ is still chosen at eval.threshold.
                self.thresholds = tune_thresholds(metrics["probabilities"], metrics["targets"])
                tuned = multi_label_scores(metrics["probabilities"], metrics["targets"], self.thresholds)
                metrics["micro_f1_tuned"], metrics["macro_f1_tuned"] = tuned["micro_f1"], tuned["macro_f1"]
            value, loss = metrics[self.metric_name], metrics.get("loss")
            improved = improves(value, s.best_metric, self.higher_is_better, stopping.min_delta, loss, s.best_loss)
            if improved:
                s.best_metric, s.best_loss, s.best_step = value, loss, s.optimizer_step
                s.evals_without_improvement = 0
                if self.cfg.checkpoint.save_best:
                    self._save_best(metrics)
            else:
                s.evals_without_improvement += 1
            epoch_no = s.epoch if s.batches_done == 0 else s.epoch + 1  # 1-based: the epoch just trained
            s.history.append({"step": s.optimizer_step, "epoch": epoch_no, **scalar_metrics(metrics)})
            self.log.eval(s.optimizer_step, epoch_no, metrics, self.metric_name, improved)
        return stopping.enabled and s.evals_without_improvement >= stopping.patience

    # ------------------------------------------------------------------------------------------------ the end

    def _summary(self) -> dict[str, Any]:
        """Final numbers (best validation, test metrics of best/, throughput, memory) into summary.json."""
        s = self.state
        summary = run_summary(self)
        summary.update(self.log.summary())
        summary["train_time_s"], summary["train_samples_per_s"] = self.throughput.totals(s.samples_seen)
        barrier()
        test = self._test_metrics()
        if test is not None:
            summary["test"] = test
        if is_main():
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))  # read as "run finished"
        self.log.info(done_line(summary))
        return summary

    def _test_metrics(self) -> dict[str, Any] | None:
        """Test metrics from best/ (chosen on validation) when there is one, else from the final weights (on every
        rank then: a sharded model's forward is collective)."""
        if self.data.test is None:
            return None
        if self.data.val is not None and (self.out / "best").is_dir():
            if not is_main():
                return None
            best = load_exported(self.out / "best", self.device).model
            tuned = read_thresholds(self.out / "best", self.data.labels or [], self.cfg.eval.threshold)
            weights, metrics = "best", self.evaluate_split(self.data.test, best, tuned)
        else:
            weights, metrics = "final", self.evaluate_split(self.data.test, thresholds=self.thresholds)
        self.log.split_metrics("test", metrics, weights=weights)
        return scalar_metrics(metrics) | {"weights": weights}


def setup(cfg: Config, resume: str | None = None) -> Trainer:
    """A trainer with everything built (and `resume` restored), not yet trained."""
    return Trainer(cfg, resume).setup()


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train as configured, in a locked run folder (see rundir.claim_output_dir); return a summary."""
    try:
        return Trainer(cfg, resume, overwrite).train()
    finally:
        release_run_lock(cfg.output_dir)
