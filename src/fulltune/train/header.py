"""What the trainer says about a run: the header before it starts (task, data, device, precision, batch
arithmetic, what trains, the speed choices, the learning-rate groups) and the numbers every run reports at the end."""

from __future__ import annotations

from typing import Any

from fulltune.data.records import split_size
from fulltune.model.trainable import describe_groups
from fulltune.runtime.memory import peak_memory_bytes
from fulltune.runtime.ranks import world_size
from fulltune.speed.plan import describe
from fulltune.train.lean_fused import describe_lean_mode


def run_header(trainer: Any) -> str:
    """What is about to run: the model, task, data, device, precision, batch arithmetic, what trains, the LR groups."""

    cfg, t, data = trainer.cfg, trainer.cfg.training, trainer.data
    global_batch = cfg.data.batch_size * t.gradient_accumulation_steps * world_size()

    n_train, n_val = (split_size(s) if s is not None else None for s in (data.train, data.val))
    val = "" if data.val is None else f", {'streamed' if n_val is None else n_val} val"
    share = 100 * trainer.trainable_params / trainer.total_params
    train = f"{n_train} train examples" if n_train is not None else "streamed train examples (length unknown)"
    return (
        f"model {cfg.model.describe()}\n"
        f"task {trainer.task_name} | method {cfg.method.name} | {train}{val}"
        f" | device {trainer.device} | precision {trainer.precision.name}{trainer.precision.note}\n"
        f"global batch {global_batch} = micro-batch {cfg.data.batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x world size {world_size()} | {trainer.steps_per_epoch} optimizer steps "
        f"per epoch, {trainer.state.total_steps} in all\n"
        f"parameters that train: {trainer.trainable_params:,} of {trainer.total_params:,} ({share:.2f}%)\n"
        + describe(trainer.speed.plan)
        + describe_lean_mode(t, trainer.device, trainer.fused is not None, trainer.optimizer)
        + describe_groups(trainer.optimizer.param_groups, t.base_learning_rate)
    )


def run_summary(trainer: Any) -> dict[str, Any]:
    """The end-of-run numbers every run reports (summary.json adds throughput and test metrics to these)."""

    s = trainer.state
    return {
        "task": trainer.task_name,
        "method": trainer.cfg.method.name,
        "optimizer_steps": s.optimizer_step,
        "epochs_done": s.epoch,
        "best_val": {trainer.metric_name: s.best_metric, "step": s.best_step},
        "trainable_parameters": trainer.trainable_params,
        "total_parameters": trainer.total_params,
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        "output_dir": str(trainer.out),
        "last_checkpoint": str(trainer.last_good) if trainer.last_good else None,
    }
