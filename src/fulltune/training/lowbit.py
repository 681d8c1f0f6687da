"""Lean mode's low-bit optimizers (`training.lean_optimizer: adamw8bit | adamw4bit | paged_adamw8bit`) and its
optimizer-state offload (`training.lean_offload`): torchao's block-quantized AdamW moments stepped one tensor at a
time (so the step stays fused into backward), their state as plain tensors for safetensors checkpoints, bitsandbytes'
paged 8-bit AdamW, and torchao's CPU offload.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from fulltune.config import TrainingConfig
from fulltune.errors import ConfigError
from fulltune.training import lowbit_update
from fulltune.training.lean import LOWBIT_STATES, BF16AdamW, PerTensorOptimizer, wants_compiled_step

__all__ = ["LowBitAdamW", "build_lowbit_optimizer", "moment_block", "without_zero_code"]

# bits -> torchao's block size (elements per fp32 scale) for that width (training/lean.py LOWBIT_STATES)
BLOCK_SIZE = {LOWBIT_STATES[k][0]: LOWBIT_STATES[k][1] for k in ("adamw8bit", "adamw4bit")}
BITS = {"adamw8bit": 8, "adamw4bit": 4}
# torchao quantizes a moment only from this many elements (as bitsandbytes); smaller tensors keep fp32 moments
MIN_QUANTIZED = 4096
INSTALL_TORCHAO = "pip install 'fulltune[lowbit]'"


def _torchao() -> Any:
    """torchao's optimizer pieces (an optional extra), or a ConfigError that says how to install it."""
    try:
        from torchao.optim import CPUOffloadOptimizer
        from torchao.optim.adam import single_param_adam
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError as err:
        raise ConfigError(f"the low-bit optimizers need torchao ({err}): {INSTALL_TORCHAO}") from None
    return SimpleNamespace(
        offload=CPUOffloadOptimizer, update=single_param_adam, state8=OptimState8bit, state4=OptimState4bit
    )


def moment_block(lean_optimizer: str, numel: int) -> int:
    """Elements per block of the moments `lean_optimizer` keeps for a tensor of `numel` elements (1: per element;
    0: its optimizer steps whole tensors only): a partial update (`update_range`) starts and ends on a block."""
    if lean_optimizer in BITS:
        block = BLOCK_SIZE[BITS[lean_optimizer]]
        return block if numel >= MIN_QUANTIZED and numel % block == 0 else 1
    return 1 if lean_optimizer == "bf16_adamw" else 0


@functools.cache
def _compiled_update() -> Callable[..., None]:
    # One graph per (state width, weight decay, rounding) and chunk shape: full chunks all share one shape.
    # Every code-book lookup indexes a 2**bits table with a code in range by construction (a uint8, or a binary
    # search over the table), so inductor's bounds check of each indirect load is dropped: on a CPU each lookup is a
    # scalar gather, and its check cost 15-30% of the update (a 4M-element tensor: 8-bit 105 -> 90 ns/element,
    # 4-bit 99 -> 71, one AVX2 core).
    options = {"assert_indirect_indexing": False}
    return torch.compile(_torchao().update, fullgraph=True, dynamic=False, options=options)


def without_zero_code(moment: Any) -> None:
    """Give an 8-bit exp_avg_sq (torchao's `OptimState8bit`, unsigned) a code book without 0: its code 0 then
    stands for half the smallest nonzero code.

    The unsigned dynamic map (bitsandbytes') has a 0 code, and its smallest other code is 3.25e-7 of the block's
    largest value: a v_i under half of that (|g_i| < ~4e-4 of the block's largest gradient) was stored as 0 while
    exp_avg_i was not, and the update m_i / (0 + eps) moved the weight by up to thousands of lr (a tiny Llama's
    embedding: 0.86 after 4 steps at lr 1e-4). Without the 0 code sqrt(v_i) stays >= ~4e-4 of the block's largest
    and the update about <= lr: the 4-bit-states paper's remedy (torchao's 4-bit map for v has no 0 either)."""
    moment.qmap[0] = moment.qmap[1] / 2


class LowBitAdamW(PerTensorOptimizer):
    """AdamW whose moments are block-quantized to 8 or 4 bits (torchao's `OptimState8bit` / `OptimState4bit`, the
    states of `torchao.optim.AdamW8bit` / `AdamW4bit`), updated by torchao's `single_param_adam` (on a CPU by
    lowbit_update.py's copy of it, bit-identical, whose code search is a table lookup), one tensor at a time:
    `step_param(p, group)` is what lean mode's fused step calls in backward, `step()` loops over it.

    Unlike torchao's own classes, the learning rate stays a float in each group (the trainer's schedule writes it;
    it goes to the update as a 0-d tensor so a compiled update is not rebuilt when it changes); each tensor is
    updated in chunks of `chunk_size` elements (a multiple of the block size), which bounds the update's fp32
    temporaries (~4 bytes x a few per chunk element) even for a 260M-element embedding, and gives every full chunk
    one shape (one compiled graph); moments of tensors under 4096 elements, or not a multiple of the block size, are
    fp32 (torchao keeps them in the weight's dtype). `stochastic_round`: bf16 weights take the update rounded up or
    down at random, unbiased; on a CPU with the bits BF16AdamW uses (a hash of the element's index and of the
    group's `seed`, the parameter's index and the step: `PerTensorOptimizer.rounding_seed`); on CUDA, and for a
    tensor whose moments stay fp32, torchao's `bf16_stochastic_round` (torch's generator, which checkpoints save).
    `compiled`: the update through `torch.compile` (a one-off build of ~10-150 s per shape on a CPU), else eager.

    `state_dict()` holds plain tensors only: a quantized moment is {"bits", "codes" (uint8), "scale" (fp32 per
    block), "qmap" (fp32 code book), "signed"}; `load_state_dict` rebuilds the torchao states from them, so a
    resumed run is bit-identical.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bits: int = 8,
        stochastic_round: bool = True,
        compiled: bool = False,
        chunk_size: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        if bits not in BLOCK_SIZE:
            raise ValueError(f"bits must be one of {tuple(BLOCK_SIZE)}, got {bits}")
        if chunk_size < 1 or chunk_size % BLOCK_SIZE[bits]:
            raise ValueError(f"chunk_size must be a positive multiple of {BLOCK_SIZE[bits]}, got {chunk_size}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        ao = _torchao()
        self._update = ao.update
        self._state_cls = ao.state8 if bits == 8 else ao.state4
        self.bits, self.block_size, self.chunk_size = bits, BLOCK_SIZE[bits], chunk_size
        self.stochastic_round, self.compiled = stochastic_round, compiled
        self._lr = torch.zeros((), dtype=torch.float32)  # the group's lr, as torchao's update takes it
        # the CPU update's new fp32 moments between its two parts (`_scratch_for`)
        self._scratch: dict[torch.device, tuple[Tensor, ...]] = {}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_contiguous():
                raise ValueError("LowBitAdamW updates contiguous parameters only")

    def _zeros(self, p: Tensor, signed: bool) -> Tensor:
        """A zero moment for `p`, flat: quantized where torchao would quantize it, else fp32."""
        n = p.numel()
        if self.range_unit(p) == 1:  # too small, or not whole blocks
            return torch.zeros(n, dtype=torch.float32, device=p.device)
        moment = self._state_cls.zeros((n,), signed, self.block_size, p.device, dtype=p.dtype)
        if self.bits == 8 and not signed:
            without_zero_code(moment)
        return moment

    def _part(self, moment: Tensor, start: int, end: int) -> Tensor:
        """Elements [start, end) of a flat moment, sharing its storage (a chunk of a quantized one: its codes and
        the scales of its blocks; `start` and `end` sit on block boundaries)."""
        if type(moment) is torch.Tensor:
            return moment[start:end]
        bs = self.block_size
        scale = moment.scale[start // bs : end // bs]
        if self.bits == 8:
            return self._state_cls(moment.codes[start:end], scale, moment.qmap, moment.signed, dtype=moment.dtype)
        codes = moment.codes[start // 2 : end // 2]  # two 4-bit codes per byte
        return self._state_cls(codes, scale, moment.qmap, moment.signed, (end - start,), dtype=moment.dtype)

    @torch.no_grad()
    def begin_update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU, as torchao keeps it
            state["exp_avg"] = self._zeros(p, signed=True)
            state["exp_avg_sq"] = self._zeros(p, signed=False)
        state["step"] += 1

    def range_unit(self, p: Tensor) -> int:
        return moment_block("adamw8bit" if self.bits == 8 else "adamw4bit", p.numel())

    @torch.no_grad()
    def update_range(self, p: Tensor, group: dict[str, Any], grad: Tensor, start: int) -> None:
        """Elements [start, start + grad.numel()) of flattened `p`; `start` and the end on block boundaries of a
        quantized moment. Pieces that are whole chunks of `p` (the shapes `step_param` hands the update) go through
        the compiled update when it is on, others through the eager one (no build per new shape)."""
        state = self.state[p]
        self._lr.fill_(group["lr"])
        beta1, beta2 = group["betas"]
        stochastic = self.stochastic_round and p.dtype == torch.bfloat16
        flat_p, flat_g, n = p.detach().view(-1), grad.reshape(-1), p.numel()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        first, end = start, start + flat_g.numel()
        tables = self._code_tables(p, m, v)
        seed, corrections = None, None
        if tables is not None:
            corrections = lowbit_update.bias_corrections(state["step"], beta1, beta2)
        if stochastic and tables is not None:
            seed = torch.tensor(self.rounding_seed(p, group, int(state["step"])), dtype=torch.int32)
        with torch._dynamo.utils.disable_cache_limit():  # a fixed, small set of shapes per model (as torchao does)
            while start < end:
                chunk_end = min(n, (start // self.chunk_size + 1) * self.chunk_size)  # p's next chunk boundary
                stop = min(end, chunk_end)
                whole = start % self.chunk_size == 0 and stop == chunk_end
                p_part, g_part = flat_p[start:stop], flat_g[start - first : stop - first]
                m_part, v_part = self._part(m, start, stop), self._part(v, start, stop)
                hyper = (beta1, beta2, group["weight_decay"], group["eps"])
                if tables is not None:
                    update = lowbit_update.compiled_update() if self.compiled and whole else lowbit_update.update
                    m_args = (m_part.codes, m_part.scale, m_part.qmap, tables[0].lookup)
                    v_args = (v_part.codes, v_part.scale, v_part.qmap, tables[1].lookup)
                    offset = torch.tensor(start, dtype=torch.int32)
                    args = (m_args, v_args, tables[0].lo, self._lr, *hyper, seed, offset, self.bits)
                    update(p_part, g_part, corrections, *args, scratch=self._scratch_for(p, stop - start))
                else:
                    update = _compiled_update() if self.compiled and whole else self._update
                    update(p_part, g_part, state["step"], m_part, v_part, None, self._lr, *hyper, True, stochastic)
                start = stop

    def _scratch_for(self, p: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Two fp32 buffers of n elements for the update's new moments, the front of two buffers kept per device
        (the size of the largest chunk seen: at most 2 x 4 bytes x `chunk_size`). Two, not halves of one: a
        compiled graph that writes two views of one storage takes AOTAutograd's slower aliased-input path."""
        bufs = self._scratch.get(p.device)
        if bufs is None or bufs[0].numel() < n:
            bufs = self._scratch[p.device] = tuple(torch.empty(n, dtype=torch.float32, device=p.device) for _ in "mv")
        return bufs[0][:n], bufs[1][:n]

    def _code_tables(self, p: Tensor, m: Tensor, v: Tensor) -> tuple[Any, Any] | None:
        """On a CPU, the code tables of `p`'s quantized moments for lowbit_update's quantizer (None: torchao's own
        update, as on CUDA and for fp32 moments)."""
        if p.device.type != "cpu" or type(m) is torch.Tensor or type(v) is torch.Tensor:
            return None
        tables = lowbit_update.code_table(m.qmap), lowbit_update.code_table(v.qmap)
        return None if None in tables else tables

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["state"] = {i: {k: self._plain(v) for k, v in s.items()} for i, s in out["state"].items()}
        return out

    def _plain(self, value: Any) -> Any:
        if not isinstance(value, self._state_cls):
            return value
        return {
            "bits": self.bits,
            "codes": value.codes,
            "scale": value.scale,
            "qmap": value.qmap,
            "signed": value.signed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # the groups (lr, betas, ...) and their checks
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id in saved:
                self.state[p] = {k: self._rebuild(k, v, p) for k, v in saved[saved_id].items()}

    def _rebuild(self, key: str, value: Any, p: Tensor) -> Tensor:
        """A state tensor from its saved form (ValueError, naming what is wrong, when it does not fit `p`)."""
        if key == "step":
            return torch.as_tensor(value, dtype=torch.float32).clone()
        if isinstance(value, Tensor):
            if value.shape != (p.numel(),) or value.dtype != torch.float32:
                raise ValueError(f"{key} of a {tuple(p.shape)} parameter has shape {tuple(value.shape)}")
            return value.to(p.device, copy=True)
        n, bs = p.numel(), self.block_size
        codes, scale, qmap = value["codes"], value["scale"], value["qmap"]
        want = (n * self.bits // 8, n // bs, 2**self.bits)
        if value["bits"] != self.bits or (codes.numel(), scale.numel(), qmap.numel()) != want:
            raise ValueError(
                f"{key} of a {tuple(p.shape)} parameter: {value['bits']}-bit state of {codes.numel()} codes, "
                f"{scale.numel()} scales, this run keeps {self.bits}-bit states ({want[0]} codes, {want[1]} scales)"
            )
        if codes.dtype != torch.uint8 or scale.dtype != torch.float32 or qmap.dtype != torch.float32:
            raise ValueError(f"{key}: codes must be uint8, scale and qmap float32")
        parts = [t.to(p.device, copy=True).reshape(-1) for t in (codes, scale, qmap)]
        if self.bits == 8:
            return self._state_cls(*parts, bool(value["signed"]), dtype=p.dtype)
        return self._state_cls(*parts, bool(value["signed"]), (n,), dtype=p.dtype)


def _clip_each_tensor(max_norm: float) -> Callable[..., None]:
    """A step pre-hook that scales each gradient so its own L2 norm is <= max_norm (lean's per-tensor clipping)."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                    p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))

    return hook


def build_lowbit_optimizer(groups: list[dict[str, Any]], t: TrainingConfig, device: torch.device) -> Any:
    """Lean mode's optimizer when it is not plain BF16AdamW: low-bit moments, paged 8-bit, or state offloaded to the
    CPU (`groups`: parameter groups without bookkeeping keys). Bad combinations are one-line ConfigErrors."""
    key = f"training.lean_optimizer={t.lean_optimizer}"
    hyper = dict(lr=t.base_learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.lean_optimizer in BITS and t.lean_rounding == "kahan":
        raise ConfigError(f"{key} rounds bf16 weights stochastically or to nearest: set training.lean_rounding")
    if t.lean_optimizer == "paged_adamw8bit":
        if t.lean_offload:
            raise ConfigError(f"{key} pages its own state: training.lean_offload=true goes with the other optimizers")
        return _paged_adamw8bit(groups, device, hyper)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    if t.lean_optimizer in BITS:
        make: Callable[..., Any] = functools.partial(
            LowBitAdamW,
            bits=BITS[t.lean_optimizer],
            stochastic_round=t.lean_rounding == "stochastic",
            compiled=wants_compiled_step(t.lean_compiled_step, n_params),
            seed=t.seed,
        )
    else:
        make = functools.partial(
            BF16AdamW,
            state_dtype=t.lean_state_dtype,
            rounding=t.lean_rounding,
            seed=t.seed,
            compiled=wants_compiled_step(t.lean_compiled_step, n_params),
        )
    if not t.lean_offload:
        return make(groups, **hyper)
    return _offloaded(groups, make, hyper, t, device)


def _paged_adamw8bit(groups: list[dict[str, Any]], device: torch.device, hyper: dict[str, Any]) -> Any:
    if device.type != "cuda":
        raise ConfigError(
            f"training.lean_optimizer=paged_adamw8bit needs a CUDA device (bitsandbytes), this run trains on "
            f"{device.type}: use adamw8bit or adamw4bit"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "training.lean_optimizer=paged_adamw8bit needs bitsandbytes: pip install bitsandbytes"
        ) from None
    return bnb.optim.PagedAdamW8bit(groups, **hyper)


def _offloaded(
    groups: list[dict[str, Any]], make: Callable[..., Any], hyper: dict[str, Any], t: TrainingConfig, device: Any
) -> Any:
    """torchao's CPUOffloadOptimizer: each tensor of 4096+ elements gets a pinned CPU copy and its own optimizer
    there; backward copies its gradient to the CPU on a side stream (and frees the GPU one), and `step()` updates on
    the CPU and copies the weight back. max_grad_norm clips each tensor's gradient, as lean's fused step does."""
    if device.type != "cuda":
        raise ConfigError(
            f"training.lean_offload=true moves optimizer state from a CUDA device to the CPU; this run trains on "
            f"{device.type}, where the state is in CPU memory already: set it to false"
        )
    if t.gradient_accumulation_steps != 1:
        raise ConfigError(
            "training.lean_offload=true frees each gradient after backward: needs gradient_accumulation_steps 1"
        )

    def inner(params: Any, **kw: Any) -> Any:
        opt = make(params, **kw)
        if t.max_grad_norm:
            opt.register_step_pre_hook(_clip_each_tensor(t.max_grad_norm))
        return opt

    return _torchao().offload(groups, inner, offload_gradients=True, **hyper)
