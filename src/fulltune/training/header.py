"""What the trainer says about a run: the header before it starts (task, data, device, precision, batch
arithmetic, what trains, the speed choices, the learning-rate groups) and the numbers every run reports at the end."""

from __future__ import annotations

from typing import Any

from fulltune.data.records import split_size
from fulltune.model.trainable import describe_groups
from fulltune.runtime.memory import peak_memory_bytes
from fulltune.runtime.ranks import world_size
from fulltune.speed.plan import describe
from fulltune.training.lean_fused import describe_lean_mode


def run_header(trainer: Any) -> str:
    """What is about to run: the model, task, data, device, precision, batch arithmetic, what trains, the LR groups."""

    cfg, t, data = trainer.cfg, trainer.cfg.training, trainer.data
    global_batch = cfg.data.batch_size * t.gradient_accumulation_steps * world_size()

    n_train, n_val = (split_size(s) if s is not None else None for s in (data.train, data.val))
    val = "" if data.val is None else f", {'streamed' if n_val is None else n_val} val"
    train = f"{n_train} train examples" if n_train is not None else "streamed train examples (length unknown)"
    picked = " (task: auto, read from the data)" if cfg.task == "auto" else ""
    return (
        f"model {cfg.model.describe()}\n"
        f"task {trainer.task_name}{picked} | method {cfg.method.name} | {train}{val}"
        f" | device {trainer.device} | precision {trainer.precision.name}{trainer.precision.note}\n"
        f"global batch {global_batch} = micro-batch {cfg.data.batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x world size {world_size()} | {trainer.steps_per_epoch} optimizer steps "
        f"per epoch, {trainer.state.total_steps} in all\n"
        f"{describe_trainable(trainer.unfreeze_counts, trainer.total_params, trainer.state.epoch)}\n"
        + describe(trainer.speed.plan)
        + describe_lean_mode(t, trainer.device, trainer.fused, trainer.optimizer)
        + describe_groups(trainer.optimizer.param_groups, t.base_learning_rate)
    )


def describe_trainable(counts: dict[int, int], total: int, epoch: int) -> str:
    """'parameters that train: N of M (P%)', as many as train in `epoch` (where this run starts), and under
    progressive unfreezing how many train once the schedule has unfrozen its last layers (`counts`: from
    `unfreeze_counts`, 0-based epochs as in the schedule; said 1-based, as the log counts epochs)."""
    now = counts[max(e for e in counts if e <= epoch)]
    line = f"parameters that train: {now:,} of {total:,} ({100 * now / total:.2f}%)"
    last = max(counts)
    if last <= epoch:
        return line
    return (
        f"{line} at the start; {counts[last]:,} ({100 * counts[last] / total:.2f}%) from epoch {last + 1} on "
        "(progressive unfreezing)"
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
