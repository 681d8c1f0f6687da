"""The AdamW update on torchao's block-quantized moments, with a faster quantizer on a CPU.

torchao's update (`single_param_adam` on `OptimState8bit` / `OptimState4bit`) finds each moment element's code by a
branchless binary search over the code book: 8 (8-bit) or 4 (4-bit) dependent table lookups, then 2 more to round.
A CPU does each lookup as a scalar load, so that search was most of the update's time. Here the code comes from a
table indexed by the value's float32 bits: its sign, exponent and top 7 mantissa bits select a bucket holding at
most one code-book boundary (checked when the table is built), the table gives the code below the bucket, and one
comparison with the next boundary settles it; rounding to the nearer code is torchao's, op for op. The codes are
the binary search's exactly, and the rest of the update is `single_param_adam`'s arithmetic in its order, so the
eager update is bit-identical to torchao's (tests/unit/test_lowbit.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

try:
    from torchao.optim.quant_utils import _fp32_to_bf16_sr
except ImportError:  # torchao is an extra (fulltune[lowbit]); lowbit.py says how to install it before any update
    _fp32_to_bf16_sr = None

__all__ = ["CodeTable", "code_table", "quantize", "update"]

# float32 bit patterns per bucket: 2**16 keeps the sign, the exponent and 7 mantissa bits (bf16's resolution)
SHIFT = 16


def _ordered(x: Tensor) -> Tensor:
    """float32 values as int32 keys in the same order (negative values mirrored below 0)."""
    bits = x.view(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


class CodeTable:
    """For a code book (ascending, values in [-1, 1]): `table[bucket - lo]` is the number of its entries after the
    first that are <= the bucket's smallest value, the code of that value in torchao's binary search."""

    def __init__(self, qmap: Tensor) -> None:
        book = qmap.detach().float().cpu()
        keys = _ordered(book[1:].contiguous()).to(torch.int64)
        if not bool((book[1:] > book[:-1]).all()) or len(set((keys >> SHIFT).tolist())) < keys.numel():
            raise ValueError("the code book is not ascending with at most one entry per table bucket")
        self.lo = int(_ordered(torch.tensor([-1.0]))) >> SHIFT
        hi = int(_ordered(torch.tensor([1.0]))) >> SHIFT
        starts = torch.arange(self.lo, hi + 1, dtype=torch.int64) << SHIFT
        self.table = torch.searchsorted(keys, starts, right=True).to(torch.int32).to(qmap.device)


@functools.cache
def _tables(book: tuple[float, ...], device: str) -> CodeTable | None:
    try:
        return CodeTable(torch.tensor(book, dtype=torch.float32, device=device))
    except ValueError:
        return None


def code_table(qmap: Tensor) -> CodeTable | None:
    """The table for this code book (built once per distinct book and device), or None where it cannot be built."""
    return _tables(tuple(qmap.tolist()), str(qmap.device))


def quantize(x: Tensor, qmap: Tensor, table: Tensor, lo: int) -> Tensor:
    """uint8 codes of `x` (scaled into [-1, 1]): torchao's `quantize_8bit_with_qmap` / `quantize_4bit_with_qmap`."""
    top = qmap.numel() - 1
    code = table[((_ordered(x) >> SHIFT) - lo).clamp(0, table.numel() - 1)]
    following = (code + 1).clamp(max=top)
    code = torch.where((x >= qmap[following]) & (code < top), following, code)
    up = (code + 1).clamp(max=top)
    down_value, up_value = qmap[code], qmap[up]
    return torch.where(x - down_value >= (up_value - down_value) * 0.5, up, code).to(torch.uint8)


def _dequantize(codes: Tensor, qmap: Tensor, scale: Tensor, bits: int) -> Tensor:
    if bits == 4:
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1)  # two codes per byte, high nibble first
    return (qmap[codes.int()].view(scale.shape[0], -1) * scale.view(-1, 1)).view(-1)


def _requantize_(x: Tensor, codes: Tensor, scale: Tensor, qmap: Tensor, table: Tensor, lo: int, bits: int) -> None:
    block = x.numel() // scale.numel()
    blocks = x.view(-1, block)
    new_scale = blocks.abs().amax(-1).clip(1e-12)  # torchao's scale_tensor
    new = quantize((blocks / new_scale.view(-1, 1)).view(-1), qmap, table, lo)
    codes.copy_((new[::2] << 4) | new[1::2] if bits == 4 else new)
    scale.copy_(new_scale)


def update(
    p: Tensor,
    grad: Tensor,
    step: Tensor,
    m: tuple[Tensor, Tensor, Tensor, Tensor],
    v: tuple[Tensor, Tensor, Tensor, Tensor],
    lo: int,
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    stochastic: bool,
    bits: int,
) -> None:
    """One AdamW update of flat `p` in place; `m` and `v` are each moment's (codes, scales, code book, code table),
    updated in place. torchao's `single_param_adam` (AdamW, no amsgrad), with `quantize` for its code search."""
    p_f32 = p.float()
    grad_f32 = grad.float()
    p_f32 = p_f32 - lr * weight_decay * p_f32
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    exp_avg = _dequantize(m[0], m[2], m[1], bits).lerp(grad_f32, 1 - beta1)
    exp_avg_sq = _dequantize(v[0], v[2], v[1], bits).lerp(grad_f32.square(), 1 - beta2)
    _requantize_(exp_avg, m[0], m[1], m[2], m[3], lo, bits)
    _requantize_(exp_avg_sq, v[0], v[1], v[2], v[3], lo, bits)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()) + eps
    p_f32 = p_f32 - lr * (exp_avg / bias_correction1) / denom
    p.copy_(_fp32_to_bf16_sr(p_f32) if stochastic else p_f32)


@functools.cache
def compiled_update() -> Callable[..., None]:
    """`update` through torch.compile: one graph per chunk shape and width. Every lookup's index is in range by
    construction (a clamped bucket, a clamped code, a uint8 or 4-bit code), so inductor's bounds checks are off."""
    return torch.compile(update, fullgraph=True, dynamic=False, options={"assert_indirect_indexing": False})
