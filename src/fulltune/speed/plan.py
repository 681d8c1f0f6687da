"""The speed plan: every CPU/GPU speed choice of a run, decided in one place (`plan`), from the config, the device
trained on, the task and the model; applied in one place (`apply`); said in one place (`describe`, the run header).

The trainer (through `model.prepare.prepare_model`), the memory planner, the benchmarks and the run header all read
the plan: nothing else decides where a choice applies or recognises a patched module. Each choice has a switch in
the `speed` config section (`auto | off`); a thread count set in `hardware.num_threads` or OMP_NUM_THREADS wins:

| choice | what it does | where `auto` applies it |
|---|---|---|
| `num_threads` | torch's CPU thread count, followed while training (`threads`) | a CPU, no count set |
| `cpu_allocator` | glibc keeps freed memory for reuse (`allocator`) | training on a CPU under glibc, no `MALLOC_*` |
| `cpu_dropout` | dropout masks from 16-bit random numbers (`cpu_dropout`) | training on a CPU, dropout layers |
| `cpu_attention` | fulltune's CPU attention (`cpu_dropout.attention`; switch `speed.cpu_dropout`) | CPU, SDPA model |
| `fused_qkv` | q, k and v as one product (`qkv`) | training on a CPU, not compiled, q/k/v triples |
| `first_token_only` | the last layer for the first token only (`first_token`) | a BERT-family classifier, not lean |
| `own_memory` | the weights that train copied out of the file mapping (`filepages`) | training on a CPU (Linux) |

`apply` makes them in that order. The process settings come first, so that the copies `own_memory` makes come from
the heap as glibc is then set up. The model's patches do not depend on one another's order: each changes modules no
other touches (dropout layers, the attention function, the q/k/v projections' class, the last layer's class, the
parameters' storage), and the first-token layer computes fused projections on their own (`QKVLinear.alone`).
What each choice buys, measured: docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fulltune.config import Config
from fulltune.speed import allocator, threads
from fulltune.speed.cpu_dropout import dropout_layers, on_sdpa, swap_dropout, use_cpu_attention
from fulltune.speed.filepages import own_memory
from fulltune.speed.first_token import applies_to, first_token_layer
from fulltune.speed.qkv import fusable, fuse_qkv
from fulltune.units import human_bytes

CHOICES = (
    "num_threads",
    "cpu_allocator",
    "cpu_dropout",
    "cpu_attention",
    "fused_qkv",
    "first_token_only",
    "own_memory",
)
"""Every choice, in the order `apply` makes them."""

SWITCH = {name: f"speed.{name}" for name in CHOICES} | {
    "num_threads": "speed.threads",
    "cpu_attention": "speed.cpu_dropout",
}
"""The config key that turns each choice off."""

LABELS = {
    "cpu_dropout": "CPU dropout masks",
    "cpu_attention": "fulltune's CPU attention",
    "fused_qkv": "q/k/v as one product",
    "first_token_only": "last layer for the first token only",
    "own_memory": "weights that train copied out of the file mapping",
}
"""What the run header's `speed:` line calls each model choice that applied."""

ALLOCATOR_KEPT = (
    "freed memory kept for reuse (glibc: no mmap for large blocks, no trimming below 2 GiB; free pages handed back "
    "when the heap has grown)"
)
ALLOCATOR_ENV = "glibc as set by MALLOC_* in the environment"
NOT_CPU = "not training on a CPU"


@dataclass(frozen=True)
class Choice:
    """One speed choice: its name (`CHOICES`), whether it applies, and why (or why not), in words."""

    name: str
    applied: bool
    reason: str


@dataclass(frozen=True)
class SpeedPlan:
    """Every speed choice of one run (`plan`), in `CHOICES` order; what `apply` makes and `describe` says."""

    device: str
    """The type of the device trained on ('cpu', 'cuda', 'meta' for the memory planner's model)."""
    choices: tuple[Choice, ...]
    threads: int | None = None
    """torch's CPU thread count where `num_threads` applies."""
    follows: bool = False
    """Whether the thread count follows the machine while training (`threads.ThreadWatch`)."""
    machine: threads.Machine | None = None
    """The machine the thread count was decided for (CPUs, cgroup quota, other work), where it was measured."""
    trains: frozenset[str] | None = None
    """The parameters `own_memory` moves: those that train (None: every parameter)."""

    def __getitem__(self, name: str) -> Choice:
        return next(c for c in self.choices if c.name == name)

    def on(self, name: str) -> bool:
        """Whether the choice `name` applies."""
        return self[name].applied

    def leaving_out(self, *names: str, reason: str = "left out by the caller") -> SpeedPlan:
        """The same plan with the choices `names` not applied (the benchmarks compare variants this way)."""
        return self.replaced(*(Choice(n, False, reason) for n in names))

    def replaced(self, *choices: Choice) -> SpeedPlan:
        """The same plan with these choices in place of those of the same names."""
        new = {c.name: c for c in choices}
        return dataclasses.replace(self, choices=tuple(new.get(c.name, c) for c in self.choices))


@dataclass(frozen=True)
class Applied:
    """What `apply` made: the plan's choices as they came out, and the heap trimmer the training loop calls after
    each optimizer step (it does nothing unless `cpu_allocator` applied)."""

    plan: SpeedPlan
    trim_heap: allocator.HeapTrim
    watch_threads: threads.ThreadWatch = dataclasses.field(default_factory=lambda: threads.ThreadWatch(None))
    """Called after each optimizer step: the thread count follows the machine; a change's log line, else None."""


# ------------------------------------------------------------------------------------------------------ deciding


def plan(
    cfg: Config,
    device: torch.device | str,
    task: str,
    model: nn.Module | None = None,
    trains: Iterable[str] | None = None,
) -> SpeedPlan:
    """Every speed choice for training `task` on `device` as `cfg` sets it up, with the reason for each.

    `model`: the model as built for training (a peft wrapper is looked through), whose parts decide where a patch
    has anything to change; None plans for a model that has every part the patches change (the memory planner's
    estimates, which read the model's parts themselves). `trains`: the names of the parameters that train (what
    `own_memory` moves; None: all)."""
    device = torch.device(device)
    sp, cpu = cfg.speed, device.type == "cpu"
    thread_choice, policy, machine = _num_threads(cfg, device.type)
    choices = (
        thread_choice,
        _allocator(sp.cpu_allocator, cpu),
        _cpu_dropout(sp.cpu_dropout, cpu, model),
        _cpu_attention(sp.cpu_dropout, cpu, model),
        _fused_qkv(sp.fused_qkv, cpu, cfg.training.compile, model),
        _first_token(sp.first_token_only, task, cfg.training.memory == "lean", model),
        _own_memory(sp.own_memory, cpu),
    )
    names = None if trains is None else frozenset(trains)
    return SpeedPlan(device.type, choices, policy.threads, policy.follows, machine, names)


def _num_threads(cfg: Config, device: str) -> tuple[Choice, threads.ThreadPolicy, threads.Machine | None]:
    """The thread choice (`threads.decide`); the machine is measured only where the count is fulltune's to choose
    (a CPU, no count in `hardware.num_threads` or OMP_NUM_THREADS, `speed.threads: auto`)."""
    configured, none = cfg.hardware.num_threads, threads.ThreadPolicy(None, False, "")
    if device == "meta":
        return Choice("num_threads", False, "the meta device runs nothing"), none, None
    if device != "cpu" and not configured:
        return Choice("num_threads", False, NOT_CPU), none, None
    automatic = not configured and not os.environ.get("OMP_NUM_THREADS") and cfg.speed.threads == "auto"
    machine = threads.machine() if automatic else None
    policy = threads.decide(machine or threads.Machine(1), os.environ, configured, cfg.speed.threads)
    if policy.threads is None:
        return Choice("num_threads", False, policy.reason), policy, None
    waits = ", ".join(f"{k}={v}" for k, v in threads.SET_AT_START.items())
    why = policy.reason + (f"; idle threads sleep at once ({waits})" if waits else "")
    return Choice("num_threads", True, why), policy, machine


def set_threads(cfg: Config, device: torch.device | str) -> Choice:
    """The thread choice for work that only runs the model (`fulltune evaluate`): decided as for training, applied
    now, not followed (it is short)."""
    choice, policy, _ = _num_threads(cfg, torch.device(device).type)
    if choice.applied:
        torch.set_num_threads(policy.threads)  # type: ignore[arg-type]
    return choice


def _off(name: str) -> Choice:
    return Choice(name, False, f"{SWITCH[name]}: off")


def _allocator(switch: str, cpu: bool) -> Choice:
    name = "cpu_allocator"
    if switch == "off":
        return _off(name)
    if not cpu:
        return Choice(name, False, NOT_CPU)
    if allocator.glibc() is None:
        return Choice(name, False, "not glibc: its allocator as it is")
    if allocator.set_by_environment():
        return Choice(name, False, ALLOCATOR_ENV)
    return Choice(name, True, ALLOCATOR_KEPT)


def _cpu_dropout(switch: str, cpu: bool, model: nn.Module | None) -> Choice:
    name = "cpu_dropout"
    if switch == "off":
        return _off(name)
    if not cpu:
        return Choice(name, False, NOT_CPU)
    if model is not None and not dropout_layers(model):
        return Choice(name, False, "the model has no dropout layer with p > 0")
    return Choice(name, True, "training on a CPU: dropout masks drawn four elements per 64-bit random number")


def _cpu_attention(switch: str, cpu: bool, model: nn.Module | None) -> Choice:
    name = "cpu_attention"
    if switch == "off":
        return _off(name)
    if not cpu:
        return Choice(name, False, NOT_CPU)
    if model is not None and not on_sdpa(model):
        return Choice(name, False, "the model is not on SDPA attention")
    return Choice(name, True, "training on a CPU with SDPA: attention dropout with the CPU masks, bf16 products")


def _fused_qkv(switch: str, cpu: bool, compiled: bool, model: nn.Module | None) -> Choice:
    name = "fused_qkv"
    if switch == "off":
        return _off(name)
    if not cpu:
        return Choice(name, False, NOT_CPU)
    if compiled:
        return Choice(name, False, "training.compile: torch.compile takes the projections as they are")
    if model is not None and not fusable(model):
        return Choice(name, False, "no q/k/v triple of plain linear layers reading one input")
    return Choice(name, True, "training on a CPU: each attention's q, k and v projections as one matrix product")


def _first_token(switch: str, task: str, lean: bool, model: nn.Module | None) -> Choice:
    name = "first_token_only"
    if switch == "off":
        return _off(name)
    if task not in ("text_classification", "multi_label_classification"):
        return Choice(name, False, f"task {task}: only a text classifier's head reads the first token alone")
    # Not in lean mode: there a dry run's peak RSS grew 15% with it (BERT, 3 layers), a cause not yet found.
    if lean:
        return Choice(name, False, "training.memory: lean keeps the full last layer")
    if model is not None and not applies_to(model):
        return Choice(name, False, "not a BERT-family sequence classifier (its head reads other positions)")
    return Choice(name, True, "a BERT-family sequence classifier: its head reads the first token only")


def _own_memory(switch: str, cpu: bool) -> Choice:
    name = "own_memory"
    if switch == "off":
        return _off(name)
    if not cpu:
        return Choice(name, False, NOT_CPU)
    if not sys.platform.startswith("linux"):
        return Choice(name, False, "not Linux: file mappings are not read")
    return Choice(name, True, "training on a CPU: the weights that train are copied out of the weight file's mapping")


# ------------------------------------------------------------------------------------------------ applying, saying


def apply(model: nn.Module, speed: SpeedPlan) -> Applied:
    """Make every choice `speed` applies, in `CHOICES` order (see the module's docstring); return the plan as it
    came out (a patch that found nothing to change is then recorded as not applied, with why) and the heap trimmer
    for the training loop."""
    outcomes: list[Choice] = []
    trim = allocator.HeapTrim(None)
    watch = threads.ThreadWatch(None)
    if speed.on("num_threads"):
        torch.set_num_threads(speed.threads)  # type: ignore[arg-type]
        if speed.follows and speed.machine is not None:
            watch = threads.ThreadWatch(speed.threads, threads.affinity(), speed.machine.quota, torch.set_num_threads)
    if speed.on("cpu_allocator"):
        trim = allocator.keep_freed_memory()
        if not trim.active:
            outcomes.append(Choice("cpu_allocator", False, "glibc refused the settings: its defaults"))
    if speed.on("cpu_dropout"):
        swap_dropout(model)
    if speed.on("cpu_attention") and not use_cpu_attention(model):
        outcomes.append(Choice("cpu_attention", False, "the model takes no custom attention: SDPA kept"))
    if speed.on("fused_qkv"):
        fuse_qkv(model)
    if speed.on("first_token_only"):
        first_token_layer(model)
    if speed.on("own_memory"):
        names = speed.trains if speed.trains is not None else {n for n, _ in model.named_parameters()}
        moved = own_memory(model, set(names))
        copied = f"{human_bytes(moved)} of weights that train copied out of the weight file's mapping"
        none = "no weight that trains lies in a file mapping"
        outcomes.append(Choice("own_memory", True, copied) if moved else Choice("own_memory", False, none))
    return Applied(speed.replaced(*outcomes), trim, watch)


def describe(speed: SpeedPlan) -> str:
    """The run header's lines on the speed choices: those applied, the CPU allocator's setting where it is said,
    and the choices a config switch turned off ('' where there is nothing to say)."""
    lines = []
    if speed.device == "cpu":
        lines.append(f"CPU threads: {speed['num_threads'].reason}")
    applied = [LABELS[c.name] for c in speed.choices if c.applied and c.name in LABELS]
    if applied:
        lines.append(f"speed: {', '.join(applied)}")
    alloc = speed["cpu_allocator"]
    if alloc.applied or alloc.reason == ALLOCATOR_ENV:
        lines.append(f"CPU allocator: {alloc.reason}")
    off = dict.fromkeys(SWITCH[c.name] for c in speed.choices if c == _off(c.name))
    if off:
        lines.append(f"speed, turned off: {', '.join(off)}")
    return "".join(line + "\n" for line in lines)
