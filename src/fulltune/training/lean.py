"""Lean full fine-tuning memory mode (`training.memory: lean`): bf16 weights updated by an AdamW that keeps
fp32-quality updates (Kahan compensation or stochastic rounding), and the bytes per parameter of every lean optimizer.
The low-bit optimizers are `fulltune.training.lowbit`; the step fused into backward (gradients freed one tensor at a
time) is `fulltune.training.lean_fused`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fulltune.training import lean_kernel as lean_kernel

__all__ = ["BF16AdamW", "build_lean_optimizer", "lean_bytes_per_param", "wants_compiled_step"]

_ROUNDINGS = ("kahan", "stochastic", "nearest")
# state_dtype -> (exp_avg dtype, exp_avg_sq dtype) for low-precision parameters.
_STATE_DTYPES = {
    "mixed": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, torch.float32),
}
_MASK64 = (1 << 64) - 1


# lean_optimizer -> (bits per moment element, elements per 4-byte fp32 scale): torchao's AdamW8bit default (256),
# and bitsandbytes' blockwise 8-bit states; 4-bit at half AdamW4bit's default block (128): 0.06 bytes/parameter more,
# and on the 110M Llama of bench/lean_memory.py (8 steps, lr 1e-4) the eval loss +0.85% from standard mode's
# instead of +1.05% (at lr 3e-4: +0.31% instead of +0.35%)
LOWBIT_STATES = {"adamw8bit": (8, 256), "adamw4bit": (4, 64), "paged_adamw8bit": (8, 256)}


def lean_bytes_per_param(state_dtype: str = "mixed", rounding: str = "kahan", optimizer: str = "bf16_adamw") -> float:
    """Persistent bytes per bf16 parameter held by lean mode's optimizer: weight + exp_avg + exp_avg_sq (+ Kahan
    compensation). BF16AdamW: by `state_dtype` and `rounding`; a low-bit `optimizer`: per moment `bits / 8` of codes
    and a 4-byte scale per block (8-bit 4.03, 4-bit 3.13; tensors under 4096 elements keep fp32 moments, which a
    model's norms and biases make negligible). With `training.lean_offload` the moments are in CPU memory instead.

    Gradients are not included: with `attach_fused_step` only the tensors in flight hold one (2 bytes each).
    """
    if optimizer in LOWBIT_STATES:
        bits, block = LOWBIT_STATES[optimizer]
        return 2 + 2 * (bits / 8 + 4 / block)
    m_dtype, v_dtype = _STATE_DTYPES[state_dtype]
    comp = 2 if rounding == "kahan" else 0
    return 2 + m_dtype.itemsize + v_dtype.itemsize + comp


# training.lean_compiled_step "auto" compiles the update from this many trainable parameters: below it the one-off
# build (20-60 s on a cold cache) costs more than the eager update's extra time over a short run.
COMPILED_STEP_MIN_PARAMS = 20_000_000


def wants_compiled_step(setting: str, n_params: int) -> bool:
    """Whether BF16AdamW runs its update as the compiled kernel (`training.lean_compiled_step`: auto, on, off); the
    trainer and the benchmarks both ask here."""
    return setting == "on" or (setting == "auto" and n_params >= COMPILED_STEP_MIN_PARAMS)


def _mix_seed(*values: int) -> int:
    # splitmix64-style mixing: a stateless per-(seed, parameter, step) stream, so stochastic rounding needs no
    # saved RNG state for a bit-identical resume and does not depend on the order parameters are updated in.
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class _Scratch:
    """The eager update's temporaries, kept between chunks and calls: up to 8 flat buffers of one chunk's size
    (4 bytes per element each; 8 MiB at the CPU default chunk). Fresh ones would cost an allocation per chunk, and
    with large allocations served by mmap each one page-faults on first touch: that was half the eager update's
    time. `view(t)` hands out, in order, buffers shaped like `t` for one chunk."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def view(self, like: Tensor) -> Callable[[torch.dtype], Tensor]:
        slots = iter(range(1 << 30))

        def take(dtype: torch.dtype) -> Tensor:
            key = (next(slots), dtype, like.device)
            buf = self._bufs.get(key)
            if buf is None or buf.numel() < like.numel():
                buf = self._bufs[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
            return buf[: like.numel()].view(like.shape)

        return take


def _copy_stochastic_(dst: Tensor, src: Tensor, noise: Tensor) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up or down with probability proportional to the distance.

    bf16 is the top half of an fp32 bit pattern: adding `noise` (int32, uniform in [0, 2**16)) to the low 16 bits
    and truncating them rounds away from zero with probability (dropped fraction), so the rounding is unbiased.
    """
    bits = noise.add_(src.view(torch.int32)).bitwise_and_(-65536)
    dst.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero


class PerTensorOptimizer(torch.optim.Optimizer):
    """An optimizer whose update is `step_param(p, group)`, one tensor at a time: lean mode's fused step calls it
    from each tensor's gradient hook; `step()` runs it over every tensor with a gradient.

    A tensor's update may also come in pieces: `begin_update(p, group)` once per step (moments created, step
    counted), then `update_range(p, group, grad, start)` for disjoint ranges of its flattened elements that together
    cover it, each with its gradient; every element gets the same update as from `step_param` (lean mode's tied
    embedding steps its rows as backward produces their gradients, `training/lean_tied.py`)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = self.__dict__.setdefault("_param_index", {})
        for p in self.param_groups[-1]["params"]:
            index[id(p)] = len(index)  # stable (the index state_dict uses), whatever order updates come in

    def rounding_seed(self, p: Tensor, group: dict[str, Any], step: int) -> int:
        """The int32 seed of `p`'s stochastic-rounding bits at `step`, from (the group's `seed`, the parameter's
        index, step): element i of `p` rounds with `lean_kernel.random_bits(.., i, seed)`, so no RNG state is saved
        for a bit-identical resume, and neither the update order nor the chunking changes the bits."""
        return lean_kernel.seed32(_mix_seed(group.get("seed", 0), self._param_index[id(p)], step))

    def begin_update(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def update_range(self, p: Tensor, group: dict[str, Any], grad: Tensor, start: int) -> None:
        raise NotImplementedError

    def range_unit(self, p: Tensor) -> int:
        """The ranges of `p` that `update_range` takes start and end on multiples of this many elements."""
        return 1

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any] | None = None) -> None:
        """Apply one AdamW update to `p` from `p.grad` (used by `step()` and by the fused-backward hooks).

        Reads the group's current `lr` (a scheduler may have changed it since the last step).
        """
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        group = self._group_of(p) if group is None else group
        self.begin_update(p, group)
        self.update_range(p, group, p.grad, 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss


class BF16AdamW(PerTensorOptimizer):
    """AdamW for bf16 parameters whose updates keep fp32 quality without an fp32 master copy.

    Each parameter is updated on its own, in chunks of `chunk_size` elements: upcast weight/grad/moments to
    fp32, do the AdamW math, downcast. So no fp32 copy of all weights (or of one big tensor) exists at once;
    the temporaries are about 28 bytes per chunk element. Default (None): 2**18 on CPU, where that memory
    shows (7 MiB; 2**20 held 0.5 bytes/param more at the peak of a 53M-parameter model), 2**24 on accelerators,
    where each chunk costs ~30 kernel launches. With `compiled=True` the update holds no temporaries and
    chunks only bound the kernel's int32 element index (default 2**30).
    With fp32 parameters the step is op-for-op `torch.optim.AdamW(foreach=False)` (states always fp32).

    `rounding` (how the fp32 result goes back into the bf16 weight):
      - "kahan" (default): a bf16 compensation buffer per parameter holds what rounding dropped from the last
        update (target - stored); it is added to the next update, so updates far below one bf16 ulp (e.g.
        lr 1e-5 on weights near 1.0, where the ulp is 2**-8) accumulate instead of vanishing.
      - "stochastic": the weight itself is rounded up or down at random, unbiased; no extra buffer, right in
        expectation but noisier per element.
      - "nearest": plain bf16 AdamW, everything rounded to nearest; for comparison only, it loses updates
        smaller than half an ulp.
    Except under "nearest", every bf16 buffer the optimizer writes (exp_avg, a bf16 exp_avg_sq, the
    compensation) is stored with stochastic rounding. Rounded to nearest, a value that changes by less than
    half an ulp per step never changes: with a steady gradient bf16 exp_avg stalls 2-4% short of it
    (0.1 * gap < 2**-9 * m), and the compensation's own error keeps one sign (constant gradient, lr 1e-5,
    weights at 1.0: 12% of 3000 steps' movement lost; stochastically: 4e-5). The random bits of element i are an
    integer hash of (i, seed of (group["seed"], parameter index, step)), `lean_kernel.random_bits`: no RNG state
    to save (a resumed run is bit-identical), and chunking or update order cannot change them.

    `state_dtype` (moments of bf16 parameters; fp32 parameters always keep fp32 moments):
      - "mixed" (default): exp_avg bf16, exp_avg_sq fp32. Unbiased bf16 rounding adds noise that the EMA
        averages over 1 / (1 - beta): about 0.5% of exp_avg with beta1 = 0.9, but about 3% of exp_avg_sq
        with beta2 = 0.999 (and rounded to nearest, exp_avg_sq can never decay: 0.1% per step is under half
        an ulp). So the second moment, which sets every step size, stays fp32.
      - "bf16": both bf16, 2 bytes less. On a small MLP regression (1500 steps, lr 1e-4 and 1e-5) it ended
        as close to fp32 AdamW as "mixed" (loss within 0.1%); exp_avg_sq rounded to nearest instead ended
        1-2% worse with up to 3x the weight drift.
      - "fp32": both fp32.

    Persistent bytes per bf16 parameter (weight + exp_avg + exp_avg_sq + compensation), see
    `lean_bytes_per_param`; torch AdamW on fp32 weights holds 4 + 4 + 4 = 12, plus a 4-byte gradient:

        ============  ======  ==========  ==========
        state_dtype   kahan   stochastic  nearest
        ============  ======  ==========  ==========
        mixed         10      8           8
        bf16          8       6           6
        fp32          12      10          10
        ============  ======  ==========  ==========

    Gradients add 2 bytes per parameter with `step()`; with `attach_fused_step` only the tensors whose
    update is in flight hold one.

    Per-group keys: `lr`, `betas`, `eps`, `weight_decay` (decoupled, as AdamW: w -= lr * wd * w),
    `state_dtype`, `rounding`, `seed`. Any other key (e.g. `lr_scale`, which the scheduler folds into `lr`)
    is carried along and ignored. `state_dict()`/`load_state_dict()` give bit-identical resumes.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: str = "mixed",
        rounding: str = "kahan",
        seed: int = 0,
        chunk_size: int | None = None,
        compiled: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        # bf16 parameters updated by one torch.compile'd kernel (training/lean_kernel.py): same math and random bits
        self.compiled = compiled
        self._scratch = _Scratch()
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["rounding"] not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {group['rounding']!r}")
        if group["state_dtype"] not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(_STATE_DTYPES)}, got {group['state_dtype']!r}")
        for p in group["params"]:
            if p.dtype not in (torch.bfloat16, torch.float32):
                raise TypeError(f"BF16AdamW handles bf16 and fp32 parameters, got {p.dtype}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype on load; our fp32 exp_avg_sq of a
        # bf16 weight must stay fp32 (else the resume is not bit-identical), so restore the saved dtypes.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @torch.no_grad()
    def begin_update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        low_precision = p.dtype == torch.bfloat16
        if not state:
            m_dtype, v_dtype = _STATE_DTYPES[group["state_dtype"]] if low_precision else (p.dtype, p.dtype)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=m_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=v_dtype)
            if low_precision and group["rounding"] == "kahan":
                state["kahan_comp"] = torch.zeros_like(p)
        state["step"] += 1

    @torch.no_grad()
    def update_range(self, p: Tensor, group: dict[str, Any], grad: Tensor, start: int) -> None:
        """Elements [start, start + grad.numel()) of flattened `p` (all of `p` when `grad` is its whole gradient)."""
        state = self.state[p]
        step = state["step"]
        low_precision = p.dtype == torch.bfloat16
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_size = lr / (1 - beta1**step)
        bc2_sqrt = (1 - beta2**step) ** 0.5
        rounding = group["rounding"] if low_precision else "fp32"
        comp = state.get("kahan_comp")
        buffers = [p, state["exp_avg"], state["exp_avg_sq"]] + ([comp] if comp is not None else [])
        if grad.numel() < p.numel():  # a range: flat views of the same elements of every buffer
            buffers = [t.detach().view(-1)[start : start + grad.numel()] for t in buffers]
            grad = grad.view(-1)
        tensors = [buffers[0], grad, *buffers[1:]]
        if low_precision and self.compiled and self._step_compiled(p, tensors, group, step, step_size, bc2_sqrt, start):
            return
        seed = None
        if low_precision and rounding != "nearest":
            seed = self.rounding_seed(p, group, step)

        hp = dict(lr=lr, wd=wd, eps=eps, beta1=beta1, beta2=beta2, step_size=step_size, bc2_sqrt=bc2_sqrt)
        size = self.chunk_size or (1 << 18 if p.device.type == "cpu" else 1 << 24)
        if size < grad.numel() and all(t.is_contiguous() for t in tensors):
            # chunking bounds the fp32 temporaries to a few chunk-sized buffers even for a huge embedding
            chunks = zip(*(t.view(-1).split(size) for t in tensors), strict=True)
        else:
            chunks = [tensors]
        for chunk in chunks:
            p_c, g_c, m_c, v_c, *c_c = chunk
            scratch = self._scratch.view(p_c)
            rand = None
            if seed is not None:  # element i's rounding bits are hash(seed, i), as in the kernel: chunking is moot
                bits, tmp = scratch(torch.int32), scratch(torch.int32)
                flat = lean_kernel.random_bits_inplace(p_c.numel(), start, seed, p.device, bits.view(-1), tmp.view(-1))
                rand = flat.view(p_c.shape)
            _adamw_chunk(p_c, g_c, m_c, v_c, c_c[0] if c_c else None, hp, rounding, rand, scratch)
            start += p_c.numel()

    def _step_compiled(
        self,
        p: Tensor,
        tensors: list[Tensor],
        group: dict[str, Any],
        step: int,
        step_size: float,
        bc2_sqrt: float,
        start: int,
    ) -> bool:
        """The update of `tensors` (weight, grad, exp_avg, exp_avg_sq[, compensation]: all of `p`'s, or the same
        range of each from element `start`) through training/lean_kernel.py; False (eager from then on) if the
        kernel cannot be built."""
        beta1, beta2 = group["betas"]
        hp = torch.tensor(
            [beta1, beta2, group["eps"], group["lr"] * group["weight_decay"], step_size, bc2_sqrt],
            dtype=torch.float32,
            device=p.device,
        )
        seed = torch.tensor(self.rounding_seed(p, group, step), dtype=torch.int32, device=p.device)
        if not all(t.is_contiguous() for t in tensors):
            return False
        # the kernel updates in place and holds no temporaries, so a whole tensor is one call; chunks only keep the
        # element index (int32 inside the kernel) in range
        size = self.chunk_size or (1 << 30)
        flat = [t.detach().view(-1) for t in tensors]
        comp = flat[4] if len(flat) > 4 else None
        for local in range(0, flat[0].numel(), size):
            chunk = [t[local : local + size] for t in flat]
            offset = torch.tensor(start + local, dtype=torch.int32, device=p.device)
            try:
                lean_kernel.compiled_update()(
                    *chunk[:4], chunk[4] if comp is not None else None, hp, seed, offset, group["rounding"]
                )
            except Exception as err:  # no C++ compiler, an unsupported backend: the eager path is always there
                if local:
                    raise
                import warnings

                warnings.warn(
                    f"BF16AdamW: the compiled update is unavailable ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); using the eager one",
                    stacklevel=2,
                )
                self.compiled = False
                return False
        return True


def _adamw_chunk(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    comp: Tensor | None,
    hp: dict[str, float],
    rounding: str,
    rand: Tensor | None,
    scratch: Callable[[torch.dtype], Tensor],
) -> None:
    """One AdamW update of (a chunk of) one parameter, all math in fp32, results stored in place. `rand`: 32 random
    bits per element (int32, shaped like p) for stochastic rounding, None to round to nearest. `scratch(dtype)`:
    the next reusable temporary shaped like p (the update's temporaries, without an allocation per chunk)."""
    lr, wd, eps, beta1, beta2 = hp["lr"], hp["wd"], hp["eps"], hp["beta1"], hp["beta2"]
    step_size, bc2_sqrt = hp["step_size"], hp["bc2_sqrt"]
    # One hash of 32 random bits per element serves every bf16 buffer written below: each store takes its own
    # 16-bit window, uniform on its own, which is all unbiased rounding needs.
    noise = None if rand is None else scratch(torch.int32)

    def store(dst: Tensor, src: Tensor, shift: int) -> None:  # fp32 -> bf16 buffer, unbiased unless "nearest"
        if rand is None:
            dst.copy_(src)
        else:
            _copy_stochastic_(dst, src, torch.bitwise_right_shift(rand, shift, out=noise).bitwise_and_(0xFFFF))

    def fp32(t: Tensor) -> Tensor:  # an fp32 tensor aliases itself (the fp32 state is then updated in place)
        return t if t.dtype == torch.float32 else scratch(torch.float32).copy_(t)

    g = fp32(grad)  # aliases grad when already fp32: only read below
    m = fp32(exp_avg)
    m.lerp_(g, 1 - beta1)
    if m is not exp_avg:
        store(exp_avg, m, 0)
    v = fp32(exp_avg_sq)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if v is not exp_avg_sq:
        store(exp_avg_sq, v, 7)
    denom = v.sqrt_() if v is not exp_avg_sq else torch.sqrt(v, out=scratch(torch.float32))
    denom.div_(bc2_sqrt).add_(eps)

    if rounding == "fp32":  # same ops, same order as torch.optim.AdamW's single-tensor path
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.addcdiv_(m, denom, value=-step_size)
        return

    target = fp32(p)
    delta = m.div_(denom) if m is not exp_avg else torch.div(m, denom, out=denom)
    del denom
    delta.mul_(-step_size)
    if wd != 0:
        delta.add_(target, alpha=-lr * wd)  # decoupled weight decay: lr * wd * w, as in AdamW
    if comp is not None:
        delta.add_(comp)  # re-apply what rounding dropped from the previous update
    target.add_(delta)  # the fp32 weight that full-precision AdamW would hold now
    if rounding == "stochastic":
        store(p, target, 15)
    else:
        p.copy_(target)  # Kahan rounds the weight to nearest: the compensation keeps the rest
    if comp is not None:
        store(comp, target.sub_(p), 15)  # residual target - stored is exact in fp32


def build_lean_optimizer(
    params_or_groups: Iterable[Tensor] | Iterable[dict[str, Any]], kind: str = "bf16_adamw", **kw: Any
) -> torch.optim.Optimizer:
    """Build the optimizer for lean mode.

    kind="bf16_adamw": `BF16AdamW(params_or_groups, **kw)` (any device, fused step supported). The low-bit
    optimizers are `fulltune.training.lowbit.LowBitAdamW` (the trainer builds them from its config through
    `lowbit.build_lowbit_optimizer`).
    """
    if kind == "bf16_adamw":
        return BF16AdamW(params_or_groups, **kw)
    raise ValueError(f"unknown lean optimizer kind {kind!r}; expected 'bf16_adamw' (low-bit: training.lowbit)")
