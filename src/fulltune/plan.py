"""`fulltune plan`: estimate the peak memory of full / partial / lora / linear_probe training before a run, check
the estimates with a 2-step dry run where they fit, and recommend a method, micro-batch and accumulation.

Peak = weights + optimizer state + max(activations, gradients): backward frees activations as it fills in
gradients, so the two add up only when gradients accumulate over micro-batches.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.config import FLAG_KEYS, Config, ConfigError, config_from_dict, flag_overrides, load_config, to_dict

METHODS = ("full", "partial", "lora", "linear_probe")
FIT_FRACTION = 0.9  # leave 10% of the budget to fragmentation, the CUDA context, data loading
# What the steps add and keep beyond tensors. CUDA: cuBLAS workspaces and library buffers. CPU: heap slack and
# autograd records (1-3 MiB in dry runs of small models). Not counted, on either: the process itself (Python, the
# imported libraries and the code pages of the kernels it runs; on CPU about 0.4 GiB with PyTorch and transformers).
RUNTIME_BYTES = {"cuda": 10 * 2**20, "cpu": 2 * 2**20}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GB' -> 24e9 bytes, '512MiB' -> 512 * 2**20, '1.5g' -> 1.5 * 2**30; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--memory_budget '{text}': expected a size such as 24GB, 16GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float | None) -> str:
    if n is None:
        return "-"
    unit, size = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if abs(n) >= s), ("B", 1))
    return f"{n / size:.2f} {unit}" if size > 1 else f"{int(n)} B"


# ---------------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Facts:
    """What one method's memory depends on: parameter counts from fulltune's own model building and method plan
    (on the meta device), and the shape of the network (the vision tower's for CLIP)."""

    total: int
    trainable: int
    largest_trainable: int
    first_layer: int  # lowest layer (0 embeddings, 1..L blocks, L+1 head) with a trainable parameter
    weight_bytes: int
    block_linear_params: int  # weights of one block's linear layers (autocast keeps a low-precision copy)
    lora_rank: int
    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tokens: int  # per example: max_length (text), seq_len (causal LM), patches + 1 (images)
    pixels: int  # input floats per image, 0 for text
    activation: str
    rms_norm: bool
    gated: bool  # SwiGLU MLP (gate, up, down)
    attn_dropout: float
    hidden_dropout: float
    eager_attention: bool


def _prepare(cfg: Config, task: str, labels: list[str] | None, device: torch.device) -> tuple[nn.Module, Any]:
    """The model as `fulltune train` sets it up (checkpointing, LoRA, lean dtype, device), with every parameter the
    method may ever train set trainable: progressive unfreezing ends there, so that is the peak to plan for."""
    from fulltune.methods import apply_trainable, enable_gradient_checkpointing, plan_method, wrap_lora
    from fulltune.models import build_model

    model = build_model(cfg, task, labels).model
    lean = cfg.training.memory == "lean"
    if cfg.training.gradient_checkpointing or lean:
        enable_gradient_checkpointing(model)
    if cfg.method.name == "lora":
        model = wrap_lora(model, cfg, task)
    if lean:
        model.to(torch.bfloat16)
    if device.type != "meta":
        model.to(device)
    plan = plan_method(model, cfg)
    apply_trainable(model, plan.eligible)
    return model, plan


def _meta_config(cfg: Config) -> Config:
    """The same model as an inline config, which build_model makes with from_config (so on the meta device) instead
    of reading weights. A pruned folder (per-layer widths) has no such config and is built for real."""
    from transformers import AutoConfig

    from fulltune.models import resolve_model_path
    from fulltune.prune import is_pruned_folder

    path = None if cfg.model.tiny_config is not None else resolve_model_path(cfg.model.name_or_path)
    if path is None or (Path(path).is_dir() and is_pruned_folder(path)):
        return cfg
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                            revision=cfg.model.revision)
    except OSError as err:
        raise ConfigError(f"model.name_or_path '{cfg.model.name_or_path}': cannot load a model config "
                          f"({str(err).splitlines()[0]})") from None
    return replace(cfg, model=replace(cfg.model, tiny_config=config.to_dict(), tokenizer=cfg.model.tokenizer or path))


def _get(config: Any, *names: str, default: Any = None) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def inspect_model(cfg: Config, task: str, labels: list[str] | None) -> Facts:
    """Facts of cfg.method.name's model: the trainable set is exactly the one `fulltune train` would train."""
    from fulltune.models import strip_peft_prefix

    with torch.device("meta"):
        model, plan = _prepare(_meta_config(cfg), task, labels, torch.device("meta"))
    params = dict(model.named_parameters())  # deduplicates tied weights
    eligible = [params[n].numel() for n in plan.eligible]
    block = plan.lmap.block_prefixes[0] + "." if plan.lmap.block_prefixes else "\0"
    config = model.config
    if task == "image_classification" and getattr(config, "vision_config", None) is not None:
        config = config.vision_config
    h, heads = int(_get(config, "hidden_size", "n_embd", "dim")), int(_get(config, "num_attention_heads", "n_head"))
    tokens, pixels = (cfg.data.seq_len if task == "causal_lm" else cfg.data.max_length), 0
    if task == "image_classification":
        side = cfg.data.image_size or int(_get(config, "image_size", default=224))
        tokens, pixels = (side // int(_get(config, "patch_size", default=16))) ** 2 + 1, 3 * side * side
    return Facts(
        total=sum(p.numel() for p in params.values()), trainable=sum(eligible), largest_trainable=max(eligible),
        first_layer=min(plan.lmap.layer_of[n] for n in plan.eligible),
        weight_bytes=sum(p.numel() for p in params.values()) * (2 if cfg.training.memory == "lean" else 4)
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        block_linear_params=sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)
                                and strip_peft_prefix(n).startswith(block) and "lora_" not in n),
        lora_rank=cfg.method.lora.r if cfg.method.name == "lora" else 0, family=plan.lmap.family, hidden=h,
        intermediate=int(_get(config, "intermediate_size", "n_inner", default=4 * h)), heads=heads,
        kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
        layers=int(_get(config, "num_hidden_layers", "n_layer")), vocab=int(_get(config, "vocab_size", default=0)),
        tokens=tokens, pixels=pixels, activation=str(_get(config, "hidden_act", "activation_function", default="gelu")),
        rms_norm=hasattr(config, "rms_norm_eps"), gated=any(n.endswith("gate_proj") for n, _ in model.named_modules()),
        attn_dropout=float(_get(config, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", default=0)),
        hidden_dropout=float(_get(config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", default=0)),
        eager_attention=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
    )


# ---------------------------------------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class Dtypes:
    compute: int  # bytes of linear layers' activations: 2 under bf16/fp16 autocast or lean, else 4
    residual: int  # the residual stream (and norms' inputs): fp32 unless lean's bf16 weights
    casts: bool  # autocast over fp32 weights: each linear keeps its own low-precision copy of input and weight
    cuda: bool


def dtypes_for(cfg: Config, device_type: str) -> Dtypes:
    from fulltune.runtime import cpu_has_fast_bf16

    lean, mode = cfg.training.memory == "lean", cfg.hardware.mixed_precision
    if mode == "auto":  # as runtime.resolve_precision decides, without asking a GPU that may not be here
        mode = "bf16" if device_type == "cuda" or cpu_has_fast_bf16() else "no"
    low = mode != "no"
    return Dtypes(2 if low or lean else 4, 2 if lean else 4, low and not lean, device_type == "cuda")


def _math_attention(f: Facts, d: Dtypes) -> bool:
    """sdpa leaves its fused kernels for the math one (S x S probabilities) on CPU when attention dropout is on."""
    return f.eager_attention or (not d.cuda and f.attn_dropout > 0)


def block_bytes(f: Facts, d: Dtypes, lora_dropout: float = 0.0) -> tuple[float, float]:
    """Activation bytes per token that one block keeps for backward, and the share of its MLP half. Tallied from
    the tensors autograd saves in BERT-, CLIP- and Llama-style blocks (torch.autograd.graph.saved_tensors_hooks)."""
    h, i, a, S = f.hidden, f.intermediate, f.heads, f.tokens
    kv = h * f.kv_heads // a
    math_attention = _math_attention(f, d)
    # LayerNorm: input + mean/rstd; Llama's RMSNorm: input, rstd, and the fp32 normalised copy if its weight trains.
    norm = (4 if d.casts else d.residual) * h + (4 + (0 if f.lora_rank else 4 * h) if f.rms_norm else 8)
    if math_attention:  # q, k, v (fp32 on CPU even under autocast), probabilities, dropout mask, dropped ones
        attention = (4 if d.casts and not d.cuda else d.compute) * (h + 2 * kv) + 4 * a * S * (
            3 if f.attn_dropout > 0 else 1)
    else:  # fused kernel: q, k, v, output and a log-sum-exp per head
        attention = d.compute * (2 * h + 2 * kv) + 4 * a
    dropout = h * (1 if d.cuda else d.compute) if f.hidden_dropout > 0 else 0  # CPU masks have the data's dtype
    act = {"quick_gelu": 2}.get(f.activation, 3 if f.gated else 1) * i * d.compute
    halves = [norm + attention + dropout, norm + dropout + act]
    # Linear layers sharing an input: (features, consumers, bytes of the input as produced; 0 = kept already).
    norm_out = 4 if d.casts else d.residual
    groups = [(h, 3, norm_out), (h, 1, (4 if d.casts and not d.cuda else d.compute) if math_attention else 0),
              (h, 2 if f.gated else 1, norm_out), (i, 1, d.compute)]
    for k, (features, consumers, produced) in enumerate(groups):
        if f.lora_rank:
            # Frozen base layer: no input kept. Adapter, run in its own (fp32) dtype by peft: the dropout mask and
            # the input of lora_A (a low-precision copy under autocast), and lora_A's output.
            x = d.residual
            lora_in = 2 if d.casts else x
            per = (x + lora_in) * features if lora_dropout > 0 else (lora_in * features if d.casts else 0)
            shared = 0 if lora_dropout > 0 or d.casts else produced * features
            halves[k // 2] += consumers * (per + f.lora_rank * d.compute) + shared
        elif produced:  # autocast casts an fp32 input once per consumer
            halves[k // 2] += features * (2 * consumers if d.casts and produced == 4 else produced)
    return halves[0] + halves[1], halves[1]


def activation_bytes(f: Facts, cfg: Config, task: str, micro_batch: int, d: Dtypes) -> float:
    """Peak activation bytes: those kept for backward plus the largest transient on top of them."""
    h, S, tokens = f.hidden, f.tokens, micro_batch * f.tokens
    # Blocks below the first trainable one keep nothing: no gradient flows through them.
    flowing = f.layers - max(f.first_layer, 1) + 1 if f.first_layer <= f.layers else 0
    per_token, mlp_half = block_bytes(f, d, cfg.method.lora.dropout)
    full_block = tokens * per_token + (2 * f.block_linear_params if d.casts else 0)  # + autocast's weight copies
    # Checkpointing keeps each block's input only and recomputes one block at a time during backward.
    checkpointed = flowing and (cfg.training.gradient_checkpointing or cfg.training.memory == "lean")
    kept = flowing * tokens * h * d.residual if checkpointed else flowing * full_block
    kept += micro_batch * h * 8  # the classifier's input and dropout mask
    norm = 4 * h + (4 + 4 * h if f.rms_norm else 8)
    top_transient = 0.0
    if task == "causal_lm":
        # Final norm, lm_head input, the logits (the loop holds them) and the log-softmax output; backward starts
        # with the gradients of the log-softmax output and input: two more fp32 copies of the logits.
        kept += tokens * (norm + h * d.compute + f.vocab * (d.compute + 4))
        top_transient = tokens * 8 * f.vocab
    elif flowing and f.family in ("bert", "generic"):
        kept += tokens * d.residual * h  # the pooler's first-token slice keeps the whole last hidden state alive
    if f.first_layer == 0:  # trainable embeddings: their norm, dropout mask, ids; or the patch convolution's input
        kept += tokens * (2 * norm if f.pixels else norm + (h * d.compute if f.hidden_dropout else 0) + 16)
        kept += micro_batch * f.pixels * (2 if d.casts else d.residual)
    # The top block's backward: gradients of the hidden states (fp32), of composite activations (quick_gelu, SwiGLU:
    # two intermediates), then of the fp32 attention probabilities, by when the MLP half's tensors are freed.
    composite = 0 if f.activation.startswith("gelu") and not f.gated else 2 * f.intermediate * d.compute
    scores = 8 * f.heads * S - mlp_half if _math_attention(f, d) else 0
    block_transient = tokens * (2 * 4 * h + max(scores, composite)) if flowing else 0
    # The logits' gradients are freed before the blocks' backward (and recomputation) begins. A recomputed block
    # also holds its raw attention scores for a moment.
    recompute = full_block + tokens * 4 * f.heads * S * _math_attention(f, d) if checkpointed else 0
    transient = max(top_transient, block_transient + recompute)
    # A frozen block's forward keeps nothing but has a working set (before any activation is kept): the residual
    # stream (the block's input, its normalised copy, its output), then q/k/v with the scores and probabilities, or
    # the MLP's intermediates: the activation's input and output; three for quick_gelu and SwiGLU, whose temporaries
    # are freed as soon as the next one exists.
    scores = 3 * 4 * f.heads * S if _math_attention(f, d) else 0
    mlp = (3 if composite else 2) * f.intermediate * d.compute
    working = tokens * (3 * 4 * h + max(4 * h * d.compute + scores, mlp))
    return max(kept + transient, working if flowing < f.layers else 0)


@dataclass
class Estimate:
    method: str
    micro_batch: int
    trainable: int
    total: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    peak: float
    forward_passes: float  # compute per optimizer step, in forward passes
    measured: float | None = None
    step_seconds: float | None = None
    fits: bool | None = None
    note: str = ""

    @property
    def best(self) -> float:
        return self.measured if self.measured is not None else self.peak


def estimate(cfg: Config, task: str, f: Facts, device_type: str) -> Estimate:
    """Peak memory of cfg.method.name at cfg.data.batch_size: weights + optimizer + max(activations, gradients)."""
    t, lean, note, d = cfg.training, cfg.training.memory == "lean", "", dtypes_for(cfg, device_type)
    optimizer = 8.0  # AdamW: exp_avg and exp_avg_sq in fp32
    if lean:
        try:
            from fulltune.lean import lean_bytes_per_param
        except ImportError:
            optimizer, note = 6.0, "lean: assumed bf16 AdamW states + bf16 compensation (6 B/param)"
        else:
            optimizer = float(lean_bytes_per_param() - 2)  # minus the bf16 weight itself
    # train.py steps BF16AdamW after the whole backward, so lean keeps every bf16 gradient; were the step fused into
    # backward (lean.attach_fused_step), about one tensor's would be alive. Its step works on chunks of 2**20
    # elements in fp32 (~5 temporaries).
    grads = f.trainable * (2 if lean else 4) + (20 * min(f.largest_trainable, 2**20) if lean else 0)
    activations = activation_bytes(f, cfg, task, cfg.data.batch_size, d)
    # From the second micro-batch on, accumulated gradients sit under a whole forward and backward.
    both = activations + grads if t.gradient_accumulation_steps > 1 else max(activations, grads)
    flowing = (f.layers - max(f.first_layer, 1) + 1) / f.layers if f.first_layer <= f.layers else 0.0
    # 1 forward + input gradients where gradient flows + weight gradients where weights train (+ recomputation).
    passes = 1 + flowing * (1 + (cfg.method.name in ("full", "partial")) + (t.gradient_checkpointing or lean))
    runtime = RUNTIME_BYTES["cuda" if d.cuda else "cpu"]
    return Estimate(cfg.method.name, cfg.data.batch_size, f.trainable, f.total, f.weight_bytes, grads,
                    f.trainable * optimizer, activations, f.weight_bytes + f.trainable * optimizer + both + runtime,
                    passes, note=note)


# ---------------------------------------------------------------------------------------------- the dry run

def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc: getrusage's ru_maxrss of a process started with
    fork+exec may be its parent's peak (Linux keeps the larger of the two)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
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
        return {"pixel_values": torch.randn(micro_batch, 3, side, side, generator=g),
                "labels": torch.randint(0, num_labels, (micro_batch,), generator=g)}
    ids = torch.randint(5, max(f.vocab, 6), (micro_batch, f.tokens), generator=g)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, num_labels, (micro_batch,))}


def dry_run(cfg: Config, task: str, labels: list[str] | None, facts: Facts, device: torch.device,
            steps: int = 2) -> dict[str, Any]:
    """Peak memory of `steps` optimizer steps of the configured training on random inputs, built and stepped as
    train.py does. CUDA: torch.cuda.max_memory_allocated. CPU: the peak RSS during the steps over the RSS after
    building model and optimizer and a one-sample forward and backward, plus the weights' bytes (part of that
    baseline, so counted, not measured)."""
    from fulltune.methods import param_groups
    from fulltune.optim import build_optimizer
    from fulltune.runtime import resolve_precision, seed_everything
    from fulltune.tasks import TASKS

    t, precision = cfg.training, resolve_precision(cfg.hardware.mixed_precision, device)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    # One tiny transformer step first: kernels, threads and autocast get set up outside the measurement.
    warm = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).to(device)
    with precision.autocast():
        warm(torch.randn(2, 8, 32, device=device)).float().sum().backward()
    torch.optim.AdamW(warm.parameters(), fused=True).step()
    seed_everything(t.seed)
    model, plan = _prepare(cfg, task, labels, device)
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
        TASKS[task].loss(model, {k: v[:1] for k, v in batch.items()}, t.label_smoothing)[0].backward()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset, base = (_reset_peak_rss(), _rss()[0]) if device.type != "cuda" else (True, 0)
    seconds = []
    for _ in range(steps):  # train.py's sequence: micro-steps, clip, step, zero_grad
        began = time.perf_counter()
        for _ in range(micro_steps):
            with precision.autocast():
                loss_sum, _logits = TASKS[task].loss(model, batch, t.label_smoothing)  # the loop keeps logits too
                loss = loss_sum / (TASKS[task].count(batch) * micro_steps)
            (scaler.scale(loss) if scaler else loss).backward()
        if t.max_grad_norm is not None:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], t.max_grad_norm,
                                           foreach=True)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss_sum, _logits, loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
    if device.type == "cuda":
        return {"measured": torch.cuda.max_memory_allocated(device), "step_seconds": seconds[-1],
                "how": "torch.cuda.max_memory_allocated"}
    how = ("CPU: peak RSS over the RSS after building and a one-sample warm-up, + the weights" if reset
           else "CPU: peak RSS of the process")
    return {"measured": _rss()[1] - base + weights, "step_seconds": seconds[-1], "how": how}


def _in_fork(job: dict[str, Any]) -> dict[str, Any]:
    """One dry run in a forked copy of the server: a fresh heap and RSS counter per method. The server has only
    imported libraries and built meta models, so no OpenMP thread pool is copied half-alive into the children."""
    def run() -> dict[str, Any]:
        try:
            return dry_run(config_from_dict(job["config"]), job["task"], job["labels"], Facts(**job["facts"]),
                           torch.device(job["device"]))
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


def _server_main() -> None:
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


def dry_runs(jobs: list[tuple[Config, str, list[str] | None, Facts, str]], timeout: float = 1800
             ) -> list[dict[str, Any]]:
    """`dry_run` of each (config, task, labels, facts, device), each in a process forked from one clean server."""
    payload = [{"config": to_dict(cfg), "task": task, "labels": labels, "facts": asdict(facts), "device": device}
               for cfg, task, labels, facts, device in jobs]
    env = dict(os.environ)
    # A fixed glibc mmap threshold gives each freed tensor back to the OS at once: the peak RSS is then the peak of
    # live memory (as CUDA's max_memory_allocated), not of what the default, self-raising threshold keeps cached.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH"))
                                        if x)
    cmd = [sys.executable, "-c", "from fulltune.plan import _server_main; _server_main()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"dry runs timed out after {timeout:.0f} s"}] * len(jobs)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [{"error": "dry run failed: " + (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
                ] * len(jobs)
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- the advice

def count_examples(cfg: Config, task: str) -> tuple[int | None, list[str] | None, str]:
    """(training examples, class names, where the count came from) from file listings and the training table only;
    (None, None, why) when the data is not there."""
    from fulltune.data.images import IMAGE_EXTENSIONS
    from fulltune.data.text import DataError, cap, label_vocabulary, read_examples, split_files

    d = cfg.data
    try:
        if task == "image_classification":
            root = Path(d.data_dir or "") / "train"
            if not d.data_dir or not root.is_dir():
                return None, None, f"no image folder '{root}'"
            n = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            n = n if (root.parent / "val").is_dir() else round(n * (1 - d.val_fraction))
            return n, sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), str(root)
        if task == "causal_lm":
            found = [Path(d.train_file or "")] + [Path(d.data_dir or "") / n for n in ("train.txt", "train.jsonl")]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                return None, None, "no training text file"
            blocks = path.stat().st_size // (4 * d.seq_len)  # ~4 characters per token
            return min(blocks, d.max_samples or blocks), None, f"{path}, in {d.seq_len}-token blocks, from its size"
        files = split_files(d)
        if files["train"] is None:
            return None, None, "no training table"
        examples = read_examples(files["train"], d)
        n = len(examples.texts) if files["val"] else round(len(examples.texts) * (1 - d.val_fraction))
        n = min(n, len(cap(examples, d.max_samples, cfg.training.seed).texts))
        return n, label_vocabulary(examples.labels), f"rows of {files['train']}"
    except (DataError, OSError) as err:
        return None, None, str(err).splitlines()[0]


@dataclass
class Recommendation:
    method: str | None
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    peak: float
    reasons: list[str]


def _with(cfg: Config, method: str, micro_batch: int | None = None, accumulation: int | None = None,
          checkpointing: bool | None = None) -> Config:
    t = cfg.training
    training = replace(t, gradient_accumulation_steps=accumulation or t.gradient_accumulation_steps,
                       gradient_checkpointing=t.gradient_checkpointing if checkpointing is None else checkpointing)
    return replace(cfg, method=replace(cfg.method, name=method), training=training,
                   data=replace(cfg.data, batch_size=micro_batch or cfg.data.batch_size))


def _order(n: int | None, full_fits: bool, performance: str | None = None) -> tuple[list[str], str]:
    """The seeds' decision rules (002's decision tree, 000's advice), and which one fired.

    data: under 1k examples LoRA/QLoRA; 1k-10k LoRA (recommended) or full; over 10k full where memory allows.
    memory (measured, not the seeds' 16/24 GB marks, which were for their CLIP job): each method in this order only
    where it fits (at some micro-batch); QLoRA (4-bit base, CUDA) where not even LoRA fits. performance: "enough"
    LoRA, "best" full.
    """
    tail = ["partial", "linear_probe"]
    if performance == "best":
        return ["full", "lora", "qlora", *tail], ("rule performance: the best result wanted -> full fine-tuning "
                                                  "where memory allows (rule memory: else LoRA, then QLoRA)")
    if performance == "enough":
        return ["lora", "qlora", "full", *tail], "rule performance: good enough -> LoRA"
    if n is None:
        return (["full", "lora", "qlora", *tail] if full_fits else ["lora", "qlora", *tail]), (
            "training set size unknown: rule memory alone -> " + ("full (it fits)" if full_fits else "LoRA"))
    if n < 1000:
        return ["lora", "qlora", *tail], (f"rule data: {n:,} training examples (under 1k) -> LoRA/QLoRA, whose few "
                                          "parameters overfit a small set less")
    if n <= 10_000:
        return ["lora", "qlora", "full", *tail], (f"rule data: {n:,} training examples (1k-10k) -> LoRA (recommended) "
                                                  "or full; --performance best asks for full")
    return ["full", "lora", "qlora", *tail], (f"rule data: {n:,} training examples (over 10k) -> full fine-tuning "
                                              "where memory allows (rule memory: else LoRA, then QLoRA)")


QLORA_BYTES_PER_FROZEN_PARAM = 0.53
"""NF4 weights with double-quantised block constants: 4 bits + ~0.13 bits of constants (bitsandbytes)."""


def _qlora_estimate(lora: Estimate) -> Estimate:
    """QLoRA from LoRA's estimate: the frozen base at 4 bits instead of its dtype, the rest as LoRA."""
    frozen = lora.total - lora.trainable
    per_param = lora.weights / max(lora.total, 1)
    weights = frozen * QLORA_BYTES_PER_FROZEN_PARAM + lora.trainable * per_param
    ratio = lora.measured / lora.peak if lora.measured else 1.0
    peak = (lora.peak - lora.weights + weights) * ratio
    return replace(lora, method="qlora", weights=weights, peak=peak, measured=None,
                   note="qlora: estimated from LoRA's with a 4-bit base (no dry run)")


def recommend(cfg: Config, task: str, results: dict[str, tuple[Estimate, Facts]], budget: int, n: int | None,
              device_type: str, performance: str | None = None) -> Recommendation:
    """The first method of the seeds' decision rules that fits, at the largest micro-batch that fits (halving from
    the configured one), accumulating to the configured global batch; checkpointing only if nothing fits without.
    QLoRA (CUDA only) is priced from LoRA's estimate; the reasons say which rule fired."""
    limit, global_batch = FIT_FRACTION * budget, cfg.data.batch_size * cfg.training.gradient_accumulation_steps
    cuda = device_type == "cuda"
    full_fits = "full" in results and results["full"][0].best <= limit
    order, why = _order(n, full_fits, performance)
    if "lora" in results and cuda and "qlora" not in results:
        results = {**results, "qlora": (_qlora_estimate(results["lora"][0]), results["lora"][1])}
    notes = [] if cuda else ["QLoRA left out: bitsandbytes' 4-bit base needs CUDA"]
    sizes = sorted({cfg.data.batch_size} | {2**k for k in range(16) if 2**k < cfg.data.batch_size}, reverse=True)
    for method in [m for m in order if m in results]:
        est, facts = results[method]
        ratio = est.measured / est.peak if est.measured else 1.0  # a dry run corrects other micro-batches too
        for checkpointing in sorted({cfg.training.gradient_checkpointing, True}):
            for m in sizes:
                accumulation = math.ceil(global_batch / m)
                if method == "qlora":  # LoRA's estimate at this size, its base at 4 bits
                    lora = results["lora"][0]
                    ratio = lora.measured / lora.peak if lora.measured else 1.0
                    peak = (estimate(_with(cfg, "lora", m, accumulation, checkpointing), task, facts, device_type).peak
                            - lora.weights + est.weights)
                else:
                    peak = estimate(_with(cfg, method, m, accumulation, checkpointing), task, facts, device_type).peak
                if peak * ratio > limit:
                    continue
                skipped = [x for x in order[: order.index(method)] if x in results]
                if method == "qlora":
                    notes.append("rule memory: not even LoRA fits the budget -> QLoRA (4-bit NF4 base: the seeds' "
                                 "choice under 16 GB)")
                speeds = ", ".join(f"{k} {e.forward_passes:.1f}" for k, (e, _) in results.items())
                return Recommendation(method, m, accumulation, checkpointing, peak * ratio, [
                    why, f"memory: {method} at micro-batch {m} x accumulation {accumulation} peaks at "
                    f"~{human(peak * ratio)}, {peak * ratio / budget:.0%} of the {human(budget)} budget"
                    + (" with gradient checkpointing" if checkpointing else ""),
                    *([f"{', '.join(skipped)} would not fit even at micro-batch 1 with checkpointing"] if skipped else []),
                    *notes,
                    f"speed, in forward passes per step: {speeds}" + ("; checkpointing adds one" if checkpointing else "")])
    return Recommendation(None, 0, 0, True, 0.0, [why, f"nothing fits {human(budget)}, even at micro-batch 1 with "
                                                       "checkpointing: try training.memory=lean, shorter inputs or "
                                                       "a smaller model", *notes])


# ---------------------------------------------------------------------------------------------- command line

def available_memory(device_type: str) -> int | None:
    """Free memory now: CUDA's free bytes, or the kernel's MemAvailable."""
    if device_type == "cuda":
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def plan(cfg: Config, budget: int | None = None, methods: tuple[str, ...] = METHODS, calibrate: bool = True,
         log: Any = None, performance: str | None = None) -> dict[str, Any]:
    """Estimate every method for `cfg`, measure those that fit, recommend one: the report `cmd_plan` prints."""
    from fulltune.tasks import infer_task

    device_type = "cuda" if cfg.hardware.device.startswith("cuda") or (
        cfg.hardware.device == "auto" and torch.cuda.is_available()) else "cpu"
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
            facts = inspect_model(_with(cfg, method), task, labels)
        except ConfigError as err:  # e.g. linear_probe of a model without a head
            errors.append({"method": method, "error": str(err)})
            continue
        results[method] = estimate(_with(cfg, method), task, facts, device_type), facts
    if not results:
        raise ConfigError("no method can be planned: " + "; ".join(dict.fromkeys(e["error"] for e in errors)))
    # Measure only what may fit: the rest is known not to, and might not fit this machine either.
    todo = [m for m, (e, _) in results.items() if calibrate and e.peak <= min(budget, free or budget)]
    if todo and log:
        log(f"dry runs of {', '.join(todo)}: 2 optimizer steps each at micro-batch {cfg.data.batch_size} ...")
    device = device_type if cfg.hardware.device == "auto" else cfg.hardware.device
    measured = dry_runs([(_with(cfg, m), task, labels, results[m][1], device) for m in todo]) if todo else []
    how = next((r["how"] for r in measured if "how" in r), "not run")
    for method, (est, _) in results.items():
        result = measured[todo.index(method)] if method in todo else {"error": "no dry run: over budget or free memory"}
        if "error" in result:
            est.note = f"{method}: {result['error']}" if calibrate else ""
        else:
            est.measured, est.step_seconds = result["measured"], result["step_seconds"]
        est.fits = est.best <= FIT_FRACTION * budget
    d = dtypes_for(cfg, device_type)
    return {
        "model": "tiny_config" if cfg.model.tiny_config is not None else cfg.model.name_or_path, "task": task,
        "device": device_type, "precision": "lean bf16" if cfg.training.memory == "lean" else
        "bf16/fp16 autocast" if d.casts else "fp32", "micro_batch": cfg.data.batch_size,
        "tokens": next(iter(results.values()))[1].tokens, "accumulation": cfg.training.gradient_accumulation_steps,
        "examples": n, "examples_source": source, "budget": budget, "budget_source": budget_source,
        "measured_how": how, "methods": [asdict(e) for e, _ in results.values()] + errors,
        "recommendation": asdict(recommend(cfg, task, results, budget, n, device_type, performance)),
    }


def format_report(r: dict[str, Any]) -> str:
    examples = f"{r['examples']:,}" if r["examples"] is not None else "unknown"
    lines = [f"fulltune plan: {r['model']} | {r['task']} | {r['device']}, {r['precision']} | micro-batch "
             f"{r['micro_batch']} x {r['tokens']} tokens, accumulation {r['accumulation']}",
             f"training examples: {examples} ({r['examples_source']}) | budget {human(r['budget'])} "
             f"({r['budget_source']})", "",
             f"{'method':<13}{'trainable':>12}" + "".join(f"{h:>12}" for h in (
                 "weights", "grads", "optimizer", "activations", "estimate", "measured")) + "  fits  fwd  s/step"]
    for m in r["methods"]:
        if "error" in m:
            lines.append(f"{m['method']:<13}  {m['error']}")
            continue
        cells = "".join(f"{human(m[k]):>12}" for k in ("weights", "gradients", "optimizer", "activations", "peak",
                                                         "measured"))
        step = f"{m['step_seconds']:.2f}" if m["step_seconds"] else "-"
        lines.append(f"{m['method']:<13}{m['trainable']:>12,}{cells}{'yes' if m['fits'] else 'no':>6}"
                     f"{m['forward_passes']:>5.1f}{step:>8}")
    rec = r["recommendation"]
    lines += ["", "estimate = weights + optimizer + max(activations, grads) (both when accumulating) + a few MiB of "
              f"buffers; measured = 2-step dry run on random inputs ({r['measured_how']}); neither counts the process "
              "itself (Python and the libraries: ~0.4 GiB on CPU); fwd = compute per step in forward passes",
              *sorted({m["note"] for m in r["methods"] if m.get("note")}), "",
              "recommendation: " + (f"method.name={rec['method']} data.batch_size={rec['micro_batch']} "
                                    f"training.gradient_accumulation_steps={rec['accumulation']}"
                                    + (" training.gradient_checkpointing=true" if rec["gradient_checkpointing"]
                                       else "") if rec["method"] else "none fits"),
              *(f"  - {reason}" for reason in rec["reasons"])]
    return "\n".join(lines)


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="estimate memory per method, check it with a dry run, recommend one")
    p.add_argument("--config", help="YAML config file")
    for flag in ("data_dir", "train_file", "val_file", "model", "task"):  # as for `fulltune train`
        p.add_argument(f"--{flag}", help=f"sets {FLAG_KEYS[flag]}")
    p.add_argument("--memory_budget", help="memory to fit in, e.g. 24GB or 16GiB (default: the device's free memory)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="plan for this device (sets hardware.device)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--no_dry_run", action="store_true", help="estimates only, no 2-step measurement")
    p.add_argument("--performance", choices=("enough", "best"),
                   help="the seeds' performance axis: good enough (LoRA) or the best result (full)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=32")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    device = [f"hardware.device={args.device}"] if args.device else []
    cfg = load_config(args.config, flag_overrides(args) + list(args.overrides or []) + device)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"--methods '{args.methods}': expected a comma-separated subset of {', '.join(METHODS)}")
    budget = parse_memory(args.memory_budget) if args.memory_budget else None
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    report = plan(cfg, budget, methods, calibrate=not args.no_dry_run, log=log, performance=args.performance)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
