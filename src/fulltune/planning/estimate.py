"""The analytic estimate of one method's peak memory: weights + optimizer state + max(activations, gradients),
with activations tallied per block from the tensors autograd keeps (BERT-, CLIP- and Llama-style blocks).

Backward frees activations as it fills in gradients, so the two add up only when gradients accumulate over
micro-batches.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from fulltune.config import Config
from fulltune.planning.facts import Facts
from fulltune.runtime.device import cpu_has_fast_bf16
from fulltune.speed.plan import plan
from fulltune.training.lean import LOWBIT_STATES, lean_bytes_per_param, wants_compiled_step
from fulltune.training.lowbit import MIN_QUANTIZED, LowBitAdamW
from fulltune.units import human_bytes

# What the steps add and keep beyond tensors. CUDA: cuBLAS workspaces and library buffers. CPU: heap slack and
# autograd records (1-3 MiB in dry runs of small models). Not counted, on either: the process itself (Python, the
# imported libraries and the code pages of the kernels it runs; on CPU about 0.4 GiB with PyTorch and transformers).
RUNTIME_BYTES = {"cuda": 10 * 2**20, "cpu": 2 * 2**20}


@dataclass(frozen=True)
class Dtypes:
    compute: int  # bytes of linear layers' activations: 2 under bf16/fp16 autocast or lean, else 4
    residual: int  # the residual stream (and norms' inputs): fp32 unless lean's bf16 weights
    casts: bool  # autocast over fp32 weights: each linear keeps its own low-precision copy of input and weight
    cuda: bool
    cpu_attention: bool = False  # the speed plan's cpu_attention where attention dropout is on: products in `compute`
    fused_qkv: bool = False  # the speed plan's fused_qkv: q, k and v share one low-precision copy of their input


def dtypes_for(cfg: Config, device_type: str, task: str) -> Dtypes:
    lean, mode = cfg.training.memory == "lean", cfg.hardware.mixed_precision
    if mode == "auto":  # as runtime.resolve_precision decides, without asking a GPU that may not be here
        mode = "bf16" if device_type == "cuda" or cpu_has_fast_bf16() else "no"
    low = mode != "no"
    speed = plan(cfg, device_type, task)  # for any model: the facts say which parts it has
    return Dtypes(
        2 if low or lean else 4,
        2 if lean else 4,
        low and not lean,
        device_type == "cuda",
        cpu_attention=speed.on("cpu_attention"),
        fused_qkv=speed.on("fused_qkv"),
    )


def _math_attention(f: Facts, d: Dtypes) -> bool:
    """sdpa leaves its fused kernels for the math one (S x S probabilities) on CPU when attention dropout is on."""
    return f.eager_attention or (not d.cuda and f.attn_dropout > 0)


def _cpu_attention(f: Facts, d: Dtypes) -> bool:
    """fulltune's CPU attention replaces SDPA's math kernel: q, k, v and the products stay in the compute dtype."""
    return d.cpu_attention and f.attn_dropout > 0 and not f.eager_attention


def block_bytes(f: Facts, d: Dtypes, lora_dropout: float = 0.0) -> tuple[float, float]:
    """Activation bytes per token that one block keeps for backward, and the share of its MLP half. Tallied from
    the tensors autograd saves in BERT-, CLIP- and Llama-style blocks (torch.autograd.graph.saved_tensors_hooks)."""
    h, i, a, S = f.hidden, f.intermediate, f.heads, f.tokens
    kv = h * f.kv_heads // a
    math_attention, ours = _math_attention(f, d), _cpu_attention(f, d)
    # LayerNorm: input + mean/rstd; Llama's RMSNorm: input, rstd, and the fp32 normalised copy if its weight trains.
    norm = (4 if d.casts else d.residual) * h + (4 + (0 if f.lora_rank else 4 * h) if f.rms_norm else 8)
    # Under math attention, what the attention's output is produced in (SDPA's math kernel: fp32 on CPU).
    attn_out = d.compute if ours or not (d.casts and not d.cuda) else 4
    if ours:  # q, k, v; the fp32 softmax output, then the dropout mask and the dropped ones in the compute dtype
        attention = d.compute * (h + 2 * kv) + a * S * (4 + 2 * d.compute)
    elif math_attention:  # q, k, v (fp32 on CPU even under autocast), probabilities, dropout mask, dropped ones
        attention = attn_out * (h + 2 * kv) + 4 * a * S * (3 if f.attn_dropout > 0 else 1)
    else:  # fused kernel: q, k, v, output and a log-sum-exp per head
        attention = d.compute * (2 * h + 2 * kv) + 4 * a
    dropout = h * (1 if d.cuda else d.compute) if f.hidden_dropout > 0 else 0  # CPU masks have the data's dtype
    act = {"quick_gelu": 2}.get(f.activation, 3 if f.gated else 1) * i * d.compute
    halves = [norm + attention + dropout, norm + dropout + act]
    # Linear layers sharing an input: (features, consumers, bytes of the input as produced; 0 = kept already).
    norm_out = 4 if d.casts else d.residual
    groups = [
        (h, 1 if d.fused_qkv and not f.lora_rank else 3, norm_out),
        (h, 1, attn_out if math_attention else 0),
        (h, 2 if f.gated else 1, norm_out),
        (i, 1, d.compute),
    ]
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
    if f.first_token and flowing and not checkpointed:  # the top block keeps k and v (and their inputs) per token
        kv = h * f.kv_heads // f.heads
        k_v = 2 * kv * (4 if _math_attention(f, d) and not _cpu_attention(f, d) and not d.cuda else d.compute)
        kept -= full_block - tokens * (k_v + (4 * h if d.casts else 0)) - (2 * f.block_linear_params if d.casts else 0)
    kept += micro_batch * h * 8  # the classifier's input and dropout mask
    norm = 4 * h + (4 + 4 * h if f.rms_norm else 8)
    top_transient = 0.0
    if task == "causal_lm":
        # Final norm, lm_head input, the logits (the loop holds them) and the log-softmax output; backward starts
        # with the gradients of the log-softmax output and input: two more fp32 copies of the logits.
        kept += tokens * (norm + h * d.compute + f.vocab * (d.compute + 4))
        top_transient = tokens * 8 * f.vocab
    elif flowing and f.family in ("bert", "generic") and not f.first_token:
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
    # (fulltune's CPU attention: bf16 scores, fp32 then bf16 probabilities, then the mask's random numbers,
    # comparison and values: 7 bytes at its fullest, 9 as measured with the allocator's slack.)
    scores = (9 if _cpu_attention(f, d) else 3 * 4) * f.heads * S if _math_attention(f, d) else 0
    mlp = (3 if composite else 2) * f.intermediate * d.compute
    working = tokens * (3 * 4 * h + max(4 * h * d.compute + scores, mlp))
    return max(kept + transient, working if flowing < f.layers else 0)


@dataclass(frozen=True)
class LowBitState:
    """How a lean low-bit optimizer stores AdamW's two moments: each tensor of at least `min_size` elements (torchao,
    as `LowBitAdamW` uses it: and a multiple of the block; bitsandbytes pads the last block) keeps `bits`-bit codes
    with one fp32 scale per block and a code book of 2**bits fp32 values per moment; smaller ones keep fp32 moments."""

    library: str
    optimizer: str  # training.lean_optimizer: its (bits, block) are `training.lean.LOWBIT_STATES`'
    fused: bool  # stepped per tensor inside backward, each gradient freed at once
    paged: bool = False  # CUDA unified memory: the states page out to host memory when the GPU runs short
    pads: bool = False  # quantizes sizes the block does not divide (the last block padded)

    def bytes_per_param(self, size: int) -> float:
        """Bytes of both moments of one `size`-element tensor, per element."""
        bits, block = LOWBIT_STATES[self.optimizer]
        if size < MIN_QUANTIZED or not (self.pads or size % block == 0):
            return 8.0
        return 2.0 * (bits / 8 + 4 * math.ceil(size / block) / size + 4 * 2**bits / size)


# lean mode's torchao 8- and 4-bit moments (`training.lowbit.LowBitAdamW`: 2 x (1 + 4/256) = 2.03 and
# 2 x (0.5 + 4/64) = 1.13 bytes a parameter, stepped per tensor in backward) and bitsandbytes' PagedAdamW8bit
# (2.03 bytes, stepped after backward: every bf16 gradient held until then).
LOW_BIT = {
    "adamw8bit": LowBitState("torchao 8-bit AdamW", "adamw8bit", fused=True),
    "adamw4bit": LowBitState("torchao 4-bit AdamW", "adamw4bit", fused=True),
    "paged_adamw8bit": LowBitState(
        "bitsandbytes PagedAdamW8bit", "paged_adamw8bit", fused=False, paged=True, pads=True
    ),
}


# Elements LowBitAdamW updates at a time (its chunk_size), which bound its eager update's temporaries.
LOW_BIT_CHUNK: int = inspect.signature(LowBitAdamW).parameters["chunk_size"].default


def low_bit_state_bytes(mode: str, sizes: tuple[int, ...] | list[int]) -> float:
    """Bytes of AdamW's moments under lean mode's low-bit optimizer `mode`, tensor by tensor."""
    state = LOW_BIT[mode]
    return sum(n * state.bytes_per_param(n) for n in sizes)


def lean_state_bytes(t: Any, sizes: tuple[int, ...] | list[int]) -> float:
    """Bytes of lean mode's optimizer state for tensors of these sizes: low-bit moments tensor by tensor, or
    BF16AdamW's moments (and Kahan compensation) at its bytes per parameter less the bf16 weight."""
    if t.lean_optimizer in LOW_BIT:
        return low_bit_state_bytes(t.lean_optimizer, sizes)
    return sum(sizes) * float(lean_bytes_per_param(t.lean_state_dtype, t.lean_rounding) - 2)


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
    host: float = 0.0  # optimizer state held in host memory (offloaded), or paged there when the GPU runs short
    measured: float | None = None
    step_seconds: float | None = None
    fits: bool | None = None
    note: str = ""

    @property
    def best(self) -> float:
        return self.measured if self.measured is not None else self.peak


def estimate(cfg: Config, task: str, f: Facts, device_type: str) -> Estimate:
    """Peak memory of cfg.method.name at cfg.data.batch_size: weights + optimizer + max(activations, gradients)."""
    t, lean, note, d = cfg.training, cfg.training.memory == "lean", "", dtypes_for(cfg, device_type, task)
    host = 0.0
    optimizer = 8.0  # AdamW: exp_avg and exp_avg_sq in fp32
    grads, fused = f.trainable * 4.0, False
    if lean:
        # Low-bit moments are sized tensor by tensor; the step is fused into backward where the optimizer steps one
        # tensor at a time (as lean_fused.fuses_step decides).
        optimizer = lean_state_bytes(t, f.trainable_sizes or (f.trainable,)) / max(f.trainable, 1)
        per_tensor = t.lean_optimizer not in LOW_BIT or LOW_BIT[t.lean_optimizer].fused
        fused = per_tensor and not t.lean_offload and t.lean_fused_step and t.gradient_accumulation_steps == 1
        if t.lean_optimizer in LOW_BIT:
            note = f"{LOW_BIT[t.lean_optimizer].library}: {optimizer:.2f} bytes of moments a parameter"
        # BF16AdamW's eager update steps each tensor in chunks of up to 2**18 elements on CPU (2**24 on
        # accelerators) through reused fp32 scratch buffers of ~28 bytes per chunk element (7 MiB on CPU); compiled
        # (auto from 20M trainable parameters) it updates in place and holds none. Fused into backward (the
        # trainer's default), a tensor's bf16 gradient is applied and freed as soon as it is final: about one is
        # alive at a time, but on top of the activations still held for the rest of backward. Otherwise every bf16
        # gradient is held until the step after backward. + a fixed 4 MiB: what the dry runs of lean mode measure
        # beyond the tensors tallied here (CPU, anonymous memory: 1-2 MiB on small BERT and CLIP, 5-6 MiB on a
        # small Llama; not traced to one tensor, and not a one-off of the optimizer's first step, which the dry
        # run's warm-up now takes outside the measurement).
        compiled = wants_compiled_step(t.lean_compiled_step, f.trainable)
        chunk = 2**18 if device_type == "cpu" else 2**24
        if t.lean_optimizer in ("adamw8bit", "adamw4bit"):
            # LowBitAdamW's update holds fp32 temporaries per element of a chunk (dequantized moments, upcast weight
            # and gradient), measured on CPU: ~57 bytes eager, ~8 compiled.
            scratch = (8 if compiled else 57) * min(f.largest_trainable, LOW_BIT_CHUNK)
        else:  # BF16AdamW's (compiled: none); bitsandbytes' kernels hold none either
            scratch = 0 if compiled or t.lean_optimizer in LOW_BIT else 28 * min(f.largest_trainable, chunk)
        step = scratch + 4 * 2**20
        grads = 2.0 * ((f.largest_fused_gradient or f.largest_trainable) if fused else f.trainable) + step
        if t.lean_offload:
            # torchao's CPUOffloadOptimizer: tensors of 4096 elements or more keep a bf16 copy, its gradient and
            # the optimizer's state in host memory, each GPU gradient freed once copied out during backward; the
            # step runs there after backward. Smaller tensors step on the GPU.
            big = [n for n in f.trainable_sizes if n >= MIN_QUANTIZED]
            host = 4.0 * sum(big) + lean_state_bytes(t, big)
            optimizer = lean_state_bytes(t, [n for n in f.trainable_sizes if n < MIN_QUANTIZED]) / max(f.trainable, 1)
            grads = 2.0 * f.largest_trainable + step
            note = f"optimizer state offloaded: {human_bytes(host)} in host memory, stepped after backward there"
    activations = activation_bytes(f, cfg, task, cfg.data.batch_size, d)
    # From the second micro-batch on, accumulated gradients sit under a whole forward and backward; a fused step
    # runs inside backward.
    both = activations + grads if t.gradient_accumulation_steps > 1 or fused else max(activations, grads)
    flowing = (f.layers - max(f.first_layer, 1) + 1) / f.layers if f.first_layer <= f.layers else 0.0
    # 1 forward + input gradients where gradient flows + weight gradients where weights train (+ recomputation).
    passes = 1 + flowing * (1 + (cfg.method.name in ("full", "partial")) + (t.gradient_checkpointing or lean))
    runtime = RUNTIME_BYTES["cuda" if d.cuda else "cpu"]
    return Estimate(
        cfg.method.name,
        cfg.data.batch_size,
        f.trainable,
        f.total,
        f.weight_bytes,
        grads,
        f.trainable * optimizer,
        activations,
        f.weight_bytes + f.trainable * optimizer + both + runtime,
        passes,
        host=host,
        note=note,
    )
