"""BF16AdamW's update of a bf16 parameter as one compiled kernel (`BF16AdamW(compiled=True)`).

The eager update runs ~25 elementwise passes over fp32 temporaries and draws its rounding bits from a
torch.Generator; on CPU it costs ~15x torch's fused fp32 AdamW per element, which made lean mode's step ~6x
standard's. Here the same math is one pure function that torch.compile fuses into a single loop: bf16 in, fp32 math
in registers, bf16 out, and the stochastic-rounding bits come from a stateless integer hash of (seed, element
index) computed in that loop, so no random tensor is stored. A bit-identical resume still holds: the seed is
(group seed, parameter index, step), as in the eager path; the bits differ from the eager path's.

int32 arithmetic wraps (two's complement) in eager PyTorch and in the vector code inductor emits, so the random bits
are the same eager and compiled, and so are the results (tests/unit/test_lean_kernel.py) except where the fp32 math
itself rounds differently: in exp_avg's lerp a cancellation (m ~ -g/9) can end one ulp of ~1e-11 apart (1 element
in 5,000 random ones). The compiled update is written in place (`update_lowp_`) and vectorized 256 bits wide
(`compiled_update`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_GOLDEN = -1640531535  # 0x9E3779B1 as int32
_MIX = 0x45D9F3B


def random_bits(n: int, offset: Tensor, seed: Tensor, device: torch.device) -> Tensor:
    """int32 hash of (seed, offset + i) for i < n: 32 well-mixed bits per element (two multiply-xorshift rounds)."""
    x = (torch.arange(n, device=device, dtype=torch.int32) + offset) * _GOLDEN + seed
    x = ((x >> 16) ^ x) * _MIX
    x = ((x >> 16) ^ x) * _MIX
    return (x >> 16) ^ x


def random_bits_inplace(
    n: int, start: int, seed: int, device: torch.device, out: Tensor | None = None, tmp: Tensor | None = None
) -> Tensor:
    """`random_bits(n, start, seed)` for the eager update: the same bits, computed in `out` with one temporary `tmp`
    (flat int32 buffers of n elements, allocated when None); each out-of-place op would allocate, and on CPU
    page-fault, another n * 4 bytes."""
    x = torch.empty(n, dtype=torch.int32, device=device) if out is None else out
    torch.arange(start, start + n, dtype=torch.int32, device=device, out=x).mul_(_GOLDEN).add_(seed)
    tmp = torch.empty_like(x) if tmp is None else tmp
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp)).mul_(_MIX)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def seed32(mixed: int) -> int:
    """The low 32 bits of a 64-bit seed as a signed int32 value (the kernel's integer type)."""
    low = mixed & 0xFFFFFFFF
    return low - (1 << 32) if low >= 1 << 31 else low


def round_bf16(x: Tensor, bits: Tensor | None, shift: int) -> Tensor:
    """fp32 -> bf16: unbiased stochastic rounding with a 16-bit window of `bits`, or to nearest when bits is None."""
    if bits is None:
        return x.to(torch.bfloat16)
    noise = (bits >> shift) & 0xFFFF
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _round_nearest(x: Tensor) -> Tensor:
    """fp32 -> the nearest bf16 value (ties to even), still in fp32: integer ops no compiler folds away."""
    bits = x.view(torch.int32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).view(torch.float32)


def update_lowp(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    comp: Tensor | None,
    hp: Tensor,
    seed: Tensor,
    offset: Tensor,
    rounding: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One AdamW update of a bf16 weight chunk; returns (weight, exp_avg, exp_avg_sq, compensation), new tensors in
    the dtypes of the inputs. hp = [beta1, beta2, eps, lr * wd, step_size, bias-correction sqrt] (fp32); seed and
    offset are int32 scalars (offset: index of the chunk's first element in its parameter)."""
    beta1, beta2, eps, lr_wd, step_size, bc2_sqrt = hp.unbind()
    bits = random_bits(p.numel(), offset, seed, p.device) if rounding != "nearest" else None
    g32 = g.float()
    m32 = m.float().lerp(g32, 1 - beta1)
    v32 = v.float() * beta2 + (1 - beta2) * g32 * g32
    p32 = p.float()
    target = p32 - step_size * (m32 / (v32.sqrt() / bc2_sqrt + eps)) - lr_wd * p32
    if comp is not None:
        target = target + comp.float()  # re-apply what rounding dropped from the previous update
    m_new = round_bf16(m32, bits, 0) if m.dtype == torch.bfloat16 else m32
    v_new = round_bf16(v32, bits, 7) if v.dtype == torch.bfloat16 else v32
    if rounding == "kahan":
        # Kahan rounds the weight to nearest and the compensation keeps the rest. The rounding is done on the bits:
        # inductor computes `target.to(bf16).float()` as target itself (it keeps bf16 values in fp32 registers),
        # which left the compensation at 0 and lost every update below half an ulp
        p_near = _round_nearest(target)
        return p_near.to(torch.bfloat16), m_new, v_new, round_bf16(target - p_near, bits, 15)
    return round_bf16(target, bits, 15), m_new, v_new, None


def update_lowp_(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    comp: Tensor | None,
    hp: Tensor,
    seed: Tensor,
    offset: Tensor,
    rounding: str,
) -> None:
    """`update_lowp` written back into p, m, v (and comp) in place. Compiled, this is one loop that reads and writes
    each buffer once: no output tensors to allocate (each a page-faulting mmap for a big parameter) and no copy
    pass afterwards, which together cost twice the update itself."""
    new = update_lowp(p, g, m, v, comp, hp, seed, offset, rounding)
    for dst, src in zip((p, m, v, comp), new, strict=True):
        if dst is not None:
            dst.copy_(src)


_compiled: dict[str, Any] = {}


def compiled_update() -> Any:
    """torch.compile(update_lowp_), built once per process; dynamic shapes, so one kernel serves every size.

    On CPU the loop is vectorized 256 bits wide even where AVX-512 is there: at 512 bits inductor's loop keeps
    every fp32 value in two registers, runs out of them and spills (4.5 ns/element on a Xeon with AMX, against
    2.4 at 256 bits; same bits out). GPU backends ignore the setting."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(update_lowp_, dynamic=True, options={"cpp.simdlen": 256})
    return _compiled["fn"]
