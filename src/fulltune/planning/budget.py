"""The direct answer to "can I fully fine-tune this model in this much memory": every full fine-tuning memory mode
(standard, lean with each optimizer, paged or offloaded states on CUDA) priced by the analytic estimate, cheapest
first (speed, then memory), and the first that fits with the config keys that select it; or, where none does, by how
much the lightest misses and what fits instead."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from fulltune.config import Config
from fulltune.planning.estimate import LOW_BIT, Estimate, estimate
from fulltune.planning.facts import Facts, inspect_model
from fulltune.units import human_bytes as human

FUSED = "fused into backward: each tensor updated and its gradient freed as soon as it is final"


@dataclass(frozen=True)
class Mode:
    """One way to hold full fine-tuning's state: the training keys that select it and what it costs in speed."""

    name: str
    keys: dict[str, Any]
    cost: str  # why it sits where it does in the order: what it adds to a step
    cuda_only: bool = False
    step: str = FUSED


OFFLOAD_KEY = "lean_offload"
"""training.<this>: lean mode's optimizer state and step on the host CPU (CUDA runs only)."""

# Cheapest first: the step's speed, then memory. Each mode gives up speed for memory against the one before.
MODES = (
    Mode(
        "standard",
        {"memory": "standard", "gradient_checkpointing": False},
        "fp32 weights and moments under "
        "bf16 autocast, no recomputation: the fastest step, 16 bytes a parameter before activations",
    ),
    Mode(
        "standard, checkpointed",
        {"memory": "standard", "gradient_checkpointing": True},
        "+ one forward recomputed per step (~1/3 more compute) for activations of one block",
    ),
    Mode(
        "lean",
        {"memory": "lean", "lean_optimizer": "bf16_adamw", "gradient_checkpointing": True},
        "bf16 weights and moments, the step fused into backward, checkpointing: ~6 bytes a parameter",
    ),
    Mode(
        "lean, 8-bit moments",
        {"memory": "lean", "lean_optimizer": "adamw8bit", "gradient_checkpointing": True},
        "+ de- and re-quantizing the moments each step: ~4 bytes a parameter",
    ),
    Mode(
        "lean, 4-bit moments",
        {"memory": "lean", "lean_optimizer": "adamw4bit", "gradient_checkpointing": True},
        "4-bit moments, a little more quantization error: ~3 bytes a parameter",
    ),
    Mode(
        "lean, paged 8-bit moments",
        {"memory": "lean", "lean_optimizer": "paged_adamw8bit", "gradient_checkpointing": True},
        "states in unified memory: what the GPU cannot hold pages to host memory and crosses PCIe every step",
        cuda_only=True,
        step="after backward (bitsandbytes steps every tensor in one call): every bf16 gradient is held until then",
    ),
    Mode(
        "lean, states offloaded",
        {"memory": "lean", "lean_optimizer": "bf16_adamw", "gradient_checkpointing": True, OFFLOAD_KEY: True},
        "moments and the step on the host CPU: every gradient and weight crosses PCIe each "
        "step, and the CPU's AdamW sets the pace: the slowest",
        cuda_only=True,
        step="after backward, on the host CPU; each gradient leaves the GPU during backward and is freed there",
    ),
)


@dataclass
class Candidate:
    mode: str
    keys: dict[str, Any]  # dotted config keys to set
    micro_batch: int
    accumulation: int
    device_bytes: float  # what the device must hold (paged: with as much of the states as fits)
    host_bytes: float  # optimizer state in host memory: offloaded, or paged out
    fits: bool
    cost: str
    step: str
    estimate: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetAnswer:
    budget: int
    limit: float
    device: str
    seq_len: int
    global_batch: int  # as configured: micro-batch x accumulation
    candidates: list[Candidate]
    chosen: int | None  # index into candidates
    over: float  # bytes by which the lightest full fine-tuning misses the limit (0 where one fits)
    longest_seq: int | None  # the chosen configuration's longest sequence at its micro-batch (causal LM)
    skipped: list[str]


def _available(mode: Mode, device_type: str) -> str | None:
    """Why `mode` is left out here, or None."""
    if mode.cuda_only and device_type != "cuda":
        return f"{mode.name}: CUDA only"
    return None


def _keys(cfg: Config, mode: Mode) -> dict[str, Any]:
    """The training keys of `mode` for this config: torchao's low-bit moments take no Kahan compensation, so a
    config that asks for it gets stochastic rounding with them."""
    low_bit = mode.keys.get("lean_optimizer") in ("adamw8bit", "adamw4bit")
    return mode.keys | ({"lean_rounding": "stochastic"} if low_bit and cfg.training.lean_rounding == "kahan" else {})


def _with(cfg: Config, mode: Mode, micro_batch: int, accumulation: int) -> Config:
    training = replace(cfg.training, gradient_accumulation_steps=accumulation, **_keys(cfg, mode))
    return replace(
        cfg,
        method=replace(cfg.method, name="full"),
        training=training,
        data=replace(cfg.data, batch_size=micro_batch),
    )


def placement(est: Estimate, paged: bool, limit: float) -> tuple[float, float, bool]:
    """(device bytes, host bytes, fits): paged states fill what the limit leaves and page out the rest, so only the
    other tensors must fit; everything else must fit whole."""
    if not paged:
        return est.peak, est.host, est.peak <= limit
    rest = est.peak - est.optimizer
    spilled = max(0.0, est.peak - limit)
    return min(est.peak, max(rest, limit)), spilled, rest <= limit


def _candidate(cfg: Config, task: str, facts: Facts, mode: Mode, m: int, acc: int, device_type: str, limit: float):
    est = estimate(_with(cfg, mode, m, acc), task, facts, device_type)
    paged = LOW_BIT.get(str(mode.keys.get("lean_optimizer")), None)
    device_bytes, host_bytes, fits = placement(est, paged is not None and paged.paged, limit)
    keys = {f"training.{k}": v for k, v in _keys(cfg, mode).items() if k != "gradient_checkpointing" or v}
    keys |= {"data.batch_size": m, "training.gradient_accumulation_steps": acc}
    step = mode.step if acc == 1 or mode.step != FUSED else "after backward (accumulation): every bf16 gradient held"
    step = step if mode.keys["memory"] == "lean" else "after backward (standard mode): every fp32 gradient held"
    return Candidate(mode.name, keys, m, acc, device_bytes, host_bytes, fits, mode.cost, step, _summary(est))


def _summary(est: Estimate) -> dict[str, Any]:
    return {k: getattr(est, k) for k in ("weights", "gradients", "optimizer", "activations", "peak", "host", "note")}


def _longest_seq(cfg: Config, task: str, facts: Facts, mode: Mode, c: Candidate, device_type: str, limit: float):
    """The longest sequence (a multiple of 128, up to 32k) that still fits at the candidate's micro-batch."""
    paged = mode.keys.get("lean_optimizer") == "paged_adamw8bit"

    def fits(n: int) -> bool:
        est = estimate(_with(cfg, mode, c.micro_batch, c.accumulation), task, replace(facts, tokens=n), device_type)
        return placement(est, paged, limit)[2]

    low, high = 0, 256  # in units of 128 tokens
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * 128) else (low, mid - 1)
    return low * 128 or None


def answer(cfg: Config, task: str, labels: list[str] | None, budget: int, device_type: str, fraction: float):
    """Every full fine-tuning mode, cheapest first, at the largest micro-batch that fits (halving from the
    configured one, accumulating to the configured global batch; then, for the modes that fuse the step into
    backward, which needs accumulation 1, at a smaller global batch); the first that fits is the answer."""
    limit, global_batch = fraction * budget, cfg.data.batch_size * cfg.training.gradient_accumulation_steps
    sizes = sorted({cfg.data.batch_size} | {2**k for k in range(16) if 2**k < cfg.data.batch_size}, reverse=True)
    facts: dict[str, Facts] = {}
    candidates, skipped, chosen, modes = [], [], None, []
    for mode in MODES:
        if (why := _available(mode, device_type)) is not None:
            skipped.append(why)
            continue
        memory = mode.keys["memory"]
        if memory not in facts:
            facts[memory] = inspect_model(_with(cfg, mode, cfg.data.batch_size, 1), task, labels)
        tries = [(m, math.ceil(global_batch / m)) for m in sizes if OFFLOAD_KEY not in mode.keys]
        if memory == "lean":  # the fused step (and the offloaded one) needs accumulation 1: a smaller global batch
            tries += [(m, 1) for m in sizes if OFFLOAD_KEY in mode.keys or math.ceil(global_batch / m) > 1]
        options = [_candidate(cfg, task, facts[memory], mode, m, a, device_type, limit) for m, a in tries]
        # Paged states cost PCIe traffic for every byte paged out, more than a smaller micro-batch costs: the least
        # paged first; otherwise the first that fits (the largest micro-batch, the configured global batch first).
        fitting = sorted((c.host_bytes, i) for i, c in enumerate(options) if c.fits)
        best = options[fitting[0][1]] if fitting else min(options, key=lambda c: c.device_bytes)
        candidates.append(best)
        modes.append(mode)
        if best.fits and chosen is None:
            chosen = len(candidates) - 1
    if not candidates:
        return BudgetAnswer(budget, limit, device_type, cfg.data.seq_len, global_batch, [], None, 0.0, None, skipped)
    over = 0.0 if chosen is not None else min(c.device_bytes for c in candidates) - limit
    longest = None
    if chosen is not None and task == "causal_lm":
        c = candidates[chosen]
        longest = _longest_seq(cfg, task, facts[modes[chosen].keys["memory"]], modes[chosen], c, device_type, limit)
    return BudgetAnswer(
        budget, limit, device_type, cfg.data.seq_len, global_batch, candidates, chosen, over, longest, skipped
    )


def format_answer(a: dict[str, Any], alternatives: list[str]) -> list[str]:
    """The answer as printed by `fulltune plan`: one line per mode, cheapest first, then the verdict."""
    lines = [
        f"full fine-tuning in {human(a['budget'])} of {a['device']} memory ({human(a['limit'])} usable), "
        f"sequence {a['seq_len']}, cheapest first (speed, then memory):"
    ]
    for i, c in enumerate(a["candidates"]):
        host = f" + {human(c['host_bytes'])} on the host" if c["host_bytes"] and c["fits"] else ""
        verdict = "fits" if c["fits"] else f"over by {human(c['device_bytes'] - a['limit'])}"
        mark = "->" if i == a["chosen"] else "  "
        lines.append(
            f" {mark} {c['mode']:<27} micro-batch {c['micro_batch']:>3} x {c['accumulation']:<3}"
            f" ~{human(c['device_bytes']):>11}{host}: {verdict}"
        )
    lines += [f"    ({s})" for s in a["skipped"]]
    if a["chosen"] is None:
        lines.append(f"answer: full fine-tuning does not fit: the lightest way misses by {human(a['over'])}")
        lines += [f"  - {x}" for x in alternatives]
        return lines
    c = a["candidates"][a["chosen"]]
    keys = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in c["keys"].items())
    lines.append(f"answer: {keys} data.seq_len={a['seq_len']}")
    lines.append(
        f"  - estimate ~{human(c['device_bytes'])} on the {'GPU' if a['device'] == 'cuda' else 'CPU'}"
        + (
            f" + {human(c['host_bytes'])} on the host (optimizer state, paged out or offloaded with weights and grads)"
            if c["host_bytes"]
            else ""
        )
        + f": weights {human(c['estimate']['weights'])}, optimizer {human(c['estimate']['optimizer'])}, "
        f"activations {human(c['estimate']['activations'])}, gradients in flight {human(c['estimate']['gradients'])}"
    )
    if a["chosen"]:
        lines.append(f"  - faster modes above it do not fit; this one: {c['cost']}")
    else:
        lines.append(f"  - the cheapest mode fits: {c['cost']}")
    lines.append(f"  - the optimizer step: {c['step']}")
    if c["micro_batch"] * c["accumulation"] < a["global_batch"]:
        lines.append(
            f"  - global batch {c['micro_batch'] * c['accumulation']} instead of the configured {a['global_batch']}: "
            "lean mode's fused (or offloaded) step needs accumulation 1"
        )
    if a["longest_seq"]:
        lines.append(f"  - longest sequence that fits at micro-batch {c['micro_batch']}: ~{a['longest_seq']} tokens")
    return lines
