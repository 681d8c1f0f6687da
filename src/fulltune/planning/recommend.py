"""The advice: estimate every method, measure those that fit with a dry run, and recommend the first method of
the users' decision rules that fits the memory budget, at the largest micro-batch that fits."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config
from fulltune.errors import ConfigError
from fulltune.model.lora import LORA_METHODS
from fulltune.model.trainable import METHODS
from fulltune.planning.dryrun import dry_runs
from fulltune.planning.estimate import Estimate, dtypes_for, estimate
from fulltune.planning.facts import Facts, count_examples, inspect_model
from fulltune.training.tasks import infer_task
from fulltune.units import human_bytes as human

FIT_FRACTION = 0.9  # leave 10% of the budget to fragmentation, the CUDA context, data loading


@dataclass
class Recommendation:
    method: str | None
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    peak: float
    reasons: list[str]


def with_method(
    cfg: Config,
    method: str,
    micro_batch: int | None = None,
    accumulation: int | None = None,
    checkpointing: bool | None = None,
) -> Config:
    t = cfg.training
    training = replace(
        t,
        gradient_accumulation_steps=accumulation or t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing if checkpointing is None else checkpointing,
    )
    return replace(
        cfg,
        method=replace(cfg.method, name=method),
        training=training,
        data=replace(cfg.data, batch_size=micro_batch or cfg.data.batch_size),
    )


def _order(n: int | None, full_fits: bool, performance: str | None = None) -> tuple[list[str], str]:
    """The decision rules of the fine-tuning tutorial (its decision tree) and of the CLIP guide, and which one fired.

    data: under 1k examples LoRA/QLoRA; 1k-10k LoRA (recommended) or full; over 10k full where memory allows.
    memory (measured, not the guides' 16/24 GB marks, which were for their CLIP job): each method in this order only
    where it fits (at some micro-batch); QLoRA (4-bit base, CUDA) where not even LoRA fits. performance: "enough"
    LoRA, "best" full.
    """
    tail = ["partial", "linear_probe"]
    if performance == "best":
        return ["full", "lora", "qlora", *tail], (
            "rule performance: the best result wanted -> full fine-tuning "
            "where memory allows (rule memory: else LoRA, then QLoRA)"
        )
    if performance == "enough":
        return ["lora", "qlora", "full", *tail], "rule performance: good enough -> LoRA"
    if n is None:
        return (["full", "lora", "qlora", *tail] if full_fits else ["lora", "qlora", *tail]), (
            "training set size unknown: rule memory alone -> " + ("full (it fits)" if full_fits else "LoRA")
        )
    if n < 1000:
        return ["lora", "qlora", *tail], (
            f"rule data: {n:,} training examples (under 1k) -> LoRA/QLoRA, whose few "
            "parameters overfit a small set less"
        )
    if n <= 10_000:
        return ["lora", "qlora", "full", *tail], (
            f"rule data: {n:,} training examples (1k-10k) -> LoRA (recommended) "
            "or full; --performance best asks for full"
        )
    return ["full", "lora", "qlora", *tail], (
        f"rule data: {n:,} training examples (over 10k) -> full fine-tuning "
        "where memory allows (rule memory: else LoRA, then QLoRA)"
    )


def _follow_dry_run(order: list[str], why: str, results: dict[str, tuple[Estimate, Facts]]) -> tuple[list[str], str]:
    """The data rules prefer LoRA for its lighter, faster steps (and its few parameters); where the dry run measured
    LoRA neither lighter nor faster than full fine-tuning on this model, full goes first: the figures win."""
    if "full" not in results or "lora" not in results or "lora" not in order:
        return order, why
    if "full" in order and order.index("full") < order.index("lora"):
        return order, why
    full, lora = results["full"][0], results["lora"][0]
    figures = (full.measured, lora.measured, full.step_seconds, lora.step_seconds)
    if any(x is None for x in figures) or lora.measured < full.measured or lora.step_seconds < full.step_seconds:
        return order, why
    return ["full", *(m for m in order if m != "full")], (
        f"{why}; but the dry run measured LoRA no lighter ({human(lora.measured)} vs full's {human(full.measured)}) "
        f"and no faster ({lora.step_seconds:.2f} vs {full.step_seconds:.2f} s/step) than full fine-tuning on this "
        "model -> full"
    )


QLORA_BYTES_PER_FROZEN_PARAM = 0.53
"""NF4 weights with double-quantised block constants: 4 bits + ~0.13 bits of constants (bitsandbytes)."""


def _qlora_estimate(lora: Estimate) -> Estimate:
    """QLoRA from LoRA's estimate: the frozen base at 4 bits instead of its dtype, the rest as LoRA."""
    frozen = lora.total - lora.trainable
    per_param = lora.weights / max(lora.total, 1)
    weights = frozen * QLORA_BYTES_PER_FROZEN_PARAM + lora.trainable * per_param
    ratio = lora.measured / lora.peak if lora.measured else 1.0
    peak = (lora.peak - lora.weights + weights) * ratio
    return replace(
        lora,
        method="qlora",
        weights=weights,
        peak=peak,
        measured=None,
        note="qlora: estimated from LoRA's with a 4-bit base (no dry run)",
    )


def _peak_at(
    cfg: Config,
    task: str,
    results: dict[str, tuple[Estimate, Facts]],
    method: str,
    facts: Facts,
    micro_batch: int,
    accumulation: int,
    checkpointing: bool,
    device_type: str,
) -> tuple[float, float]:
    """(estimated peak, dry-run correction) of `method` at this micro-batch; QLoRA is LoRA's estimate with the base
    at 4 bits. The correction (measured / estimated at the configured batch) applies to other batches too."""
    base = "lora" if method == "qlora" else method
    ref = results[base][0]
    ratio = ref.measured / ref.peak if ref.measured else 1.0
    peak = estimate(with_method(cfg, base, micro_batch, accumulation, checkpointing), task, facts, device_type).peak
    if method == "qlora":
        peak += results["qlora"][0].weights - ref.weights
    return peak, ratio


def recommend(
    cfg: Config,
    task: str,
    results: dict[str, tuple[Estimate, Facts]],
    budget: int,
    n: int | None,
    device_type: str,
    performance: str | None = None,
) -> Recommendation:
    """The first method of the decision rules (`_order`; the dry run's figures overrule them where it measured LoRA
    neither lighter nor faster than full: `_follow_dry_run`) that fits, at the largest micro-batch that fits (halving
    from the configured one), accumulating to the configured global batch; checkpointing only if nothing fits without.
    QLoRA (CUDA only) is priced from LoRA's estimate; the reasons say which rule fired."""
    limit, global_batch = FIT_FRACTION * budget, cfg.data.batch_size * cfg.training.gradient_accumulation_steps
    cuda = device_type == "cuda"
    full_fits = "full" in results and results["full"][0].best <= limit
    order, why = _order(n, full_fits, performance)
    if performance is None:  # an explicit --performance is the user's call, not the data rules'
        order, why = _follow_dry_run(order, why, results)
    if "lora" in results and cuda and "qlora" not in results:
        results = {**results, "qlora": (_qlora_estimate(results["lora"][0]), results["lora"][1])}
    notes = [] if cuda else ["QLoRA left out: bitsandbytes' 4-bit base needs CUDA"]
    sizes = sorted({cfg.data.batch_size} | {2**k for k in range(16) if 2**k < cfg.data.batch_size}, reverse=True)
    for method in [m for m in order if m in results]:
        facts = results[method][1]
        for checkpointing in sorted({cfg.training.gradient_checkpointing, True}):
            for m in sizes:
                accumulation = math.ceil(global_batch / m)
                peak, ratio = _peak_at(cfg, task, results, method, facts, m, accumulation, checkpointing, device_type)
                if peak * ratio > limit:
                    continue
                skipped = [x for x in order[: order.index(method)] if x in results]
                if method == "qlora":
                    notes.append(
                        "rule memory: not even LoRA fits the budget -> QLoRA (4-bit NF4 base: the tutorial's "
                        "choice under 16 GB)"
                    )
                speeds = ", ".join(f"{k} {e.forward_passes:.1f}" for k, (e, _) in results.items())
                return Recommendation(
                    method,
                    m,
                    accumulation,
                    checkpointing,
                    peak * ratio,
                    [
                        why,
                        f"memory: {method} at micro-batch {m} x accumulation {accumulation} peaks at "
                        f"~{human(peak * ratio)}, {peak * ratio / budget:.0%} of the {human(budget)} budget"
                        + (" with gradient checkpointing" if checkpointing else ""),
                        *(
                            [f"{', '.join(skipped)} would not fit even at micro-batch 1 with checkpointing"]
                            if skipped
                            else []
                        ),
                        *notes,
                        f"speed, in forward passes per step: {speeds}"
                        + ("; checkpointing adds one" if checkpointing else ""),
                    ],
                )
    nothing = f"nothing fits {human(budget)}, even at micro-batch 1 with checkpointing: try training.memory=lean, "
    return Recommendation(None, 0, 0, True, 0.0, [why, nothing + "shorter inputs or a smaller model", *notes])


def precision_notes(
    cfg: Config, task: str, labels: list[str] | None, results: dict[str, tuple[Estimate, Facts]], device_type: str
) -> list[str]:
    """What lean mode and model.torch_dtype would change, with their estimates: the table prices the config as given,
    and standard mode's fp32 weights and moments (16 bytes a parameter) are most of a large model's full peak."""
    notes = []
    if "full" in results and cfg.training.memory != "lean":
        lean = with_method(replace(cfg, training=replace(cfg.training, memory="lean")), "full")
        peak = estimate(lean, task, inspect_model(lean, task, labels), device_type).peak
        notes.append(
            f"full: standard mode trains fp32 weights with fp32 AdamW moments whatever model.torch_dtype loads "
            f"(~{human(results['full'][0].peak)}); training.memory=lean (bf16 weights and moments, gradient "
            f"checkpointing) estimates ~{human(peak)}"
        )
    if "lora" in results and cfg.model.torch_dtype == "float32":
        bf16 = with_method(replace(cfg, model=replace(cfg.model, torch_dtype="bfloat16")), "lora")
        peak = estimate(bf16, task, inspect_model(bf16, task, labels), device_type).peak
        notes.append(
            f"lora: the frozen base loads in fp32 (model.torch_dtype=float32, ~{human(results['lora'][0].peak)}); "
            f"model.torch_dtype=bfloat16 keeps it in bf16: ~{human(peak)}"
        )
    return notes


def device_type_of(cfg: Config) -> str:
    """ "cuda" or "cpu": where a run of `cfg` trains (hardware.device, auto: CUDA where there is one)."""
    device = cfg.hardware.device
    return "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"


ESTIMATE_SLACK = 0.85
"""The estimate's low end: dry runs measure 0.85-1.15x of it, so a run is refused only where even 85% of it does not
fit."""


def check_memory(cfg: Config, task: str, labels: list[str] | None, what: str) -> str:
    """Before a training run starts: its estimated peak (the estimate `fulltune plan` prints) against the free memory
    of its device. Where even the estimate's low end does not fit, one ConfigError line with the figures and the
    settings that lower them; else a line saying the estimate."""
    device_type = device_type_of(cfg)
    est = estimate(cfg, task, inspect_model(cfg, task, labels), device_type)
    free = available_memory(device_type)
    line = f"memory: {what} is estimated to peak at ~{human(est.peak)} ({cfg.method.name}"
    line += f", weights {human(est.weights)}, optimizer {human(est.optimizer)}, activations {human(est.activations)})"
    if free is None:
        return f"{line}; free {device_type} memory unknown"
    if ESTIMATE_SLACK * est.peak <= free:
        return f"{line}; {human(free)} of {device_type} memory free"
    lower = ["training.memory=lean (bf16 weights and moments)"] if cfg.training.memory != "lean" else []
    if cfg.method.name not in LORA_METHODS:
        lower.append("method.name=lora with model.torch_dtype=bfloat16")
    lower.append("a smaller data.batch_size or shorter inputs")
    raise ConfigError(f"{line}, but {human(free)} of {device_type} memory is free: try {', or '.join(lower)}")


def available_memory(device_type: str) -> int | None:
    """Free memory now: CUDA's free bytes, or the kernel's MemAvailable."""
    if device_type == "cuda":
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def run_steps(cfg: Config, examples: int | None) -> int | None:
    """Optimizer steps of one training run of `cfg` over `examples` training examples (None when unknown)."""
    t = cfg.training
    if t.max_steps:
        return t.max_steps
    if not examples:
        return None
    n = min(examples, cfg.data.max_samples or examples)
    return -(-n // (cfg.data.batch_size * t.gradient_accumulation_steps)) * t.num_epochs


def plan(
    cfg: Config,
    budget: int | None = None,
    methods: tuple[str, ...] = METHODS,
    calibrate: bool = True,
    log: Any = None,
    performance: str | None = None,
) -> dict[str, Any]:
    """Estimate every method for `cfg`, measure those that fit, recommend one: the report `cmd_plan` prints."""

    device_type = device_type_of(cfg)
    calibrate = calibrate and (device_type == "cpu" or torch.cuda.is_available())  # no GPU here: estimates only
    free = available_memory(device_type)
    budget_source = "--memory_budget" if budget else f"free {device_type} memory now"
    budget = budget or free or 0
    if budget <= 0:
        raise ConfigError("cannot tell this device's free memory; give --memory_budget, e.g. --memory_budget 24GB")
    task = infer_task(cfg)
    n, labels, source = count_examples(cfg, task)
    if labels is None and task != "causal_lm":
        labels = [f"class{i}" for i in range(cfg.data.num_classes or 2)]
    results: dict[str, tuple[Estimate, Facts]] = {}
    errors = []
    for method in methods:
        try:
            facts = inspect_model(with_method(cfg, method), task, labels)
        except ConfigError as err:  # e.g. linear_probe of a model without a head
            errors.append({"method": method, "error": str(err)})
            continue
        results[method] = estimate(with_method(cfg, method), task, facts, device_type), facts
    if not results:
        raise ConfigError("no method can be planned: " + "; ".join(dict.fromkeys(e["error"] for e in errors)))
    # Measure only what may fit: the rest is known not to, and might not fit this machine either.
    todo = [m for m, (e, _) in results.items() if calibrate and e.peak <= min(budget, free or budget)]
    if todo and log:
        log(f"dry runs of {', '.join(todo)}: 2 optimizer steps each at micro-batch {cfg.data.batch_size} ...")
    device = device_type if cfg.hardware.device == "auto" else cfg.hardware.device
    measured = dry_runs([(with_method(cfg, m), task, labels, results[m][1], device) for m in todo]) if todo else []
    how = next((r["how"] for r in measured if "how" in r), "not run")
    for method, (est, _) in results.items():
        result = measured[todo.index(method)] if method in todo else {"error": "no dry run: over budget or free memory"}
        if "error" in result:
            est.note = f"{method}: {result['error']}" if calibrate else ""
        else:
            est.measured, est.step_seconds = result["measured"], result["step_seconds"]
        est.fits = est.best <= FIT_FRACTION * budget
    d = dtypes_for(cfg, device_type, task)
    return {
        "model": "tiny_config" if cfg.model.tiny_config is not None else cfg.model.name_or_path,
        "task": task,
        "device": device_type,
        "precision": "lean bf16" if cfg.training.memory == "lean" else "bf16/fp16 autocast" if d.casts else "fp32",
        "micro_batch": cfg.data.batch_size,
        "tokens": next(iter(results.values()))[1].tokens,
        "accumulation": cfg.training.gradient_accumulation_steps,
        "examples": n,
        "examples_source": source,
        "steps_per_run": run_steps(cfg, n),
        "budget": budget,
        "budget_source": budget_source,
        "measured_how": how,
        "methods": [asdict(e) for e, _ in results.values()] + errors,
        "precision_notes": precision_notes(cfg, task, labels, results, device_type),
        "recommendation": asdict(recommend(cfg, task, results, budget, n, device_type, performance)),
    }
