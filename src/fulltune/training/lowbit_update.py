"""The AdamW update on torchao's block-quantized moments, with a faster quantizer on a CPU.

torchao's update (`single_param_adam` on `OptimState8bit` / `OptimState4bit`) finds each moment element's code by a
branchless binary search over the code book: 8 (8-bit) or 4 (4-bit) dependent table lookups, then 2 more to round.
A CPU does each lookup as a scalar load, so that search was most of the update's time. Search and rounding together
map a value to its code by a step function that only goes up, so they are fixed by the code book's thresholds: the
smallest float32 that torchao codes as 1, as 2, ... (found once per code book by bisecting float32 bit patterns with
torchao's own quantizer). Here a table indexed by the value's float32 bits (its sign, exponent and top 7 mantissa
bits: a bucket holding at most one threshold, checked when the table is built) gives, in one int64 lookup, the code
of the bucket's smallest value and the next threshold above it, and one comparison settles the code: one lookup
instead of ten (8-bit); a 4-bit value's code is the count of the 15 thresholds it reaches, compares that vectorize
where six lookups did not. The codes are torchao's exactly, and the rest of the update is `single_param_adam`'s
arithmetic in its order, so the eager update is bit-identical to torchao's (tests/unit/test_lowbit.py) where weights
are fp32 or rounded to nearest.

A bf16 weight is rounded stochastically as lean mode's BF16AdamW rounds it (`lean_kernel.round_bf16` with the bits
of `lean_kernel.random_bits`: a hash of the element's index and a per-(parameter, step) seed), not from torch's
generator as torchao draws them: drawing a random tensor was 40% of the compiled update's time on a CPU, the hash is
a few integer ops in the same loop, and a resume needs no generator state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fulltune.training.lean_kernel import random_bits, round_bf16

__all__ = ["CodeTable", "bias_corrections", "code_table", "encode", "quantize", "update"]

# float32 bit patterns per bucket: 2**16 keeps the sign, the exponent and 7 mantissa bits (bf16's resolution)
SHIFT = 16


def _ordered(x: Tensor) -> Tensor:
    """float32 values as int32 keys in the same order (negative values mirrored below 0)."""
    bits = x.view(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _value(keys: Tensor) -> Tensor:
    """The float32 values of int64 keys of `_ordered`."""
    magnitude = keys.abs().to(torch.int32).view(torch.float32)
    return torch.where(keys < 0, -magnitude, magnitude)


def _reference(book: Tensor) -> Callable[[Tensor], Tensor]:
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    search = {256: quantize_8bit_with_qmap, 16: quantize_4bit_with_qmap}.get(book.numel())
    if search is None:
        raise ValueError(f"a code book of {book.numel()} entries (torchao's have 256 or 16)")
    return lambda x: search(x, book).to(torch.int64)


class CodeTable:
    """A code book's thresholds and bucket table: `thresholds[c]` is the smallest float32 that torchao's search and
    rounding code as c + 1 or more (+inf after the last code), `base[bucket - lo]` the code of a bucket's smallest
    value, so a value's code is `base[b] + (x >= thresholds[base[b]])`; `packed[b]` holds both (the base code in
    the low bits, the float32 bits of that threshold in the high 32) for `quantize`'s one lookup."""

    def __init__(self, qmap: Tensor) -> None:
        book = qmap.detach().float().cpu().contiguous()
        if not bool((book[1:] > book[:-1]).all()):
            raise ValueError("the code book is not ascending")
        reference, top = _reference(book), book.numel() - 1
        low_key, high_key = (int(k) for k in _ordered(torch.tensor([-1.0, 1.0])))
        self.lo, hi = low_key >> SHIFT, high_key >> SHIFT
        # bisect, for every code k = 1..top at once, the smallest key in [-1, 1] that torchao codes as k or more
        wanted = torch.arange(1, top + 1)
        left = torch.full((top,), low_key, dtype=torch.int64)
        right = torch.full((top,), high_key, dtype=torch.int64)
        if bool((reference(_value(left)) >= wanted).any()) or not bool((reference(_value(right)) >= wanted).all()):
            raise ValueError("the code book does not code -1 as 0 and 1 as its last code")
        while bool((right - left > 1).any()):
            mid = (left + right) // 2
            up = reference(_value(mid)) >= wanted
            left, right = torch.where(up, left, mid), torch.where(up, mid, right)
        starts = torch.arange(self.lo, hi + 1, dtype=torch.int64) << SHIFT
        base = torch.searchsorted(right, starts, right=True)
        inside = torch.searchsorted(right, starts + (1 << SHIFT) - 1, right=True) - base
        if bool((inside > 1).any()):
            raise ValueError("a table bucket holds more than one threshold of the code book")
        if not torch.equal(base, reference(_value(starts).clamp(-1.0, 1.0))):
            raise ValueError("torchao's search does not code the code book's values in order")
        self.base = base.to(torch.int32).to(qmap.device)
        self.thresholds = torch.cat([_value(right), torch.tensor([float("inf")])]).to(qmap.device)
        # one lookup per value: a bucket's base code in the low bits, the float32 bits of its next threshold above
        following = self.thresholds.cpu()[base].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        self.packed = ((following << 32) | base).to(qmap.device)
        # what the update looks codes up in: the packed table, or a 4-bit book's 15 thresholds (see `encode`)
        self.lookup = self.packed if book.numel() == 256 else self.thresholds[:-1].contiguous()


@functools.cache
def _tables(book: tuple[float, ...], device: str) -> CodeTable | None:
    try:
        return CodeTable(torch.tensor(book, dtype=torch.float32, device=device))
    except ValueError:
        return None


def code_table(qmap: Tensor) -> CodeTable | None:
    """The table for this code book (built once per distinct book and device), or None where it cannot be built."""
    return _tables(tuple(qmap.tolist()), str(qmap.device))


def quantize(x: Tensor, packed: Tensor, lo: int) -> Tensor:
    """uint8 codes of `x` (scaled into [-1, 1]): torchao's `quantize_8bit_with_qmap` / `quantize_4bit_with_qmap`,
    from a code table's `packed` and `lo`."""
    entry = packed[((_ordered(x) >> SHIFT) - lo).clamp(0, packed.numel() - 1)]
    following = (entry >> 32).to(torch.int32).view(torch.float32)
    return ((entry & 0xFF) + (x >= following).to(torch.int64)).to(torch.uint8)


def _dequantize(codes: Tensor, qmap: Tensor, scale: Tensor, bits: int) -> Tensor:
    if bits == 8 or not torch.compiler.is_compiling():
        if bits == 4:
            codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1)  # two codes per byte, high nibble first
        return (qmap[codes.int()].view(scale.shape[0], -1) * scale.view(-1, 1)).view(-1)
    # Compiled 4-bit, in one loop over the elements inductor fuses with the update (as the 8-bit lookup is): each
    # element's nibble by a shift of its byte, its value by 15 selects on the code as a float (which vectorize,
    # where a lookup is a scalar load, its index widened to int64 by a scalar loop), its block's scale by index.
    # As above, the nibbles' stack became a separate concatenation and the (blocks, 64) view a second loop, each
    # with a buffer per chunk: 14 -> 8.5 ns/element on a 64M-element tensor.
    odd = torch.arange(codes.numel() * 2, dtype=torch.int32, device=codes.device) & 1
    as_float = ((codes.repeat_interleave(2).int() >> ((1 - odd) * 4)) & 0b1111).float()
    values = qmap[0].expand(as_float.shape)
    for k in range(1, 16):
        values = torch.where(as_float >= k, qmap[k], values)
    return values * scale.repeat_interleave(values.numel() // scale.numel())


def bias_corrections(step: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """AdamW's `1 - beta1**step` and `sqrt(1 - beta2**step)` as torchao computes them, once per tensor and step:
    inside the compiled update they were two powf and a sqrt per vector of 32 elements."""
    return 1 - beta1**step, (1 - beta2**step).sqrt()


def encode(x: Tensor, table: Tensor, lo: int) -> Tensor:
    """`quantize` with a code table's `packed` (a 256-entry book), or the count of the thresholds `x` reaches (a
    16-entry book, `table` its 15 thresholds: compares inductor vectorizes instead of a lookup)."""
    if table.numel() != 15:
        return quantize(x, table, lo)
    if not torch.compiler.is_compiling():  # eager, each compare would be a whole temporary: one search instead
        return torch.searchsorted(table, x, right=True).to(torch.uint8)
    count = (x >= table[0]).to(torch.int32)
    for k in range(1, 15):
        count = count + (x >= table[k]).to(torch.int32)
    return count.to(torch.uint8)


def _requantize_(x: Tensor, codes: Tensor, scale: Tensor, table: Tensor, lo: int, bits: int) -> None:
    block = x.numel() // scale.numel()
    blocks = x.view(-1, block)
    new_scale = blocks.abs().amax(-1).clip(1e-12)  # torchao's scale_tensor
    new = encode((blocks / new_scale.view(-1, 1)).view(-1), table, lo)
    codes.copy_((new[::2] << 4) | new[1::2] if bits == 4 else new)
    scale.copy_(new_scale)


def _step_weight(
    p: Tensor,
    grad: Tensor,
    corrections: tuple[Tensor, Tensor],
    m: tuple[Tensor, Tensor, Tensor, Tensor],
    v: tuple[Tensor, Tensor, Tensor, Tensor],
    hyper: tuple[Tensor, float, float, float, float, Tensor | None, Tensor],
    bits: int,
    out: tuple[Tensor, Tensor],
) -> None:
    """The weight's part of `update` (`hyper`: its lr .. offset), in place; the new moments go to `out` (fp32)."""
    lr, beta1, beta2, weight_decay, eps, seed, offset = hyper
    bias_correction1, bias_correction2_sqrt = corrections
    p_f32 = p.float()
    grad_f32 = grad.float()
    p_f32 = p_f32 - lr * weight_decay * p_f32
    exp_avg = _dequantize(m[0], m[2], m[1], bits).lerp(grad_f32, 1 - beta1)
    exp_avg_sq = _dequantize(v[0], v[2], v[1], bits).lerp(grad_f32.square(), 1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt) + eps
    p_f32 = p_f32 - lr * (exp_avg / bias_correction1) / denom
    p.copy_(p_f32 if seed is None else round_bf16(p_f32, random_bits(p_f32.numel(), offset, seed, p.device), 15))
    out[0].copy_(exp_avg)
    out[1].copy_(exp_avg_sq)


def _store_moments(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    m: tuple[Tensor, Tensor, Tensor, Tensor],
    v: tuple[Tensor, Tensor, Tensor, Tensor],
    lo: int,
    bits: int,
) -> None:
    _requantize_(exp_avg, m[0], m[1], m[3], lo, bits)
    _requantize_(exp_avg_sq, v[0], v[1], v[3], lo, bits)


def update(
    p: Tensor,
    grad: Tensor,
    corrections: tuple[Tensor, Tensor],
    m: tuple[Tensor, Tensor, Tensor, Tensor],
    v: tuple[Tensor, Tensor, Tensor, Tensor],
    lo: int,
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    seed: Tensor | None,
    offset: Tensor,
    bits: int,
    parts: tuple[Callable[..., Any], Callable[..., Any]] = (_step_weight, _store_moments),
    scratch: tuple[Tensor, Tensor] | None = None,
) -> None:
    """One AdamW update of flat `p` in place; `m` and `v` are each moment's (codes, scales, code book, and its code
    table's `lookup`), updated in place; `corrections`: `bias_corrections` of the step. torchao's
    `single_param_adam` (AdamW, no amsgrad), with `encode` for its code search. `seed` (int32, 0-d): round a bf16
    `p` stochastically with the bits of elements `offset` .. of the parameter (None: to nearest). `parts`: the
    weight's step and the moments' requantization (compiled ones from `compiled_update`). `scratch`: two fp32
    buffers of p's size for the new moments between the two (allocated when None; a caller that keeps them spares
    a fresh 8 bytes per element, page faults included, per call)."""
    step_weight, store_moments = parts
    if scratch is None:
        scratch = (torch.empty_like(p, dtype=torch.float32), torch.empty_like(p, dtype=torch.float32))
    step_weight(p, grad, corrections, m, v, (lr, beta1, beta2, weight_decay, eps, seed, offset), bits, scratch)
    store_moments(*scratch, m, v, lo, bits)


@functools.cache
def compiled_update() -> Callable[..., None]:
    """`update` through torch.compile, as two graphs per chunk shape and width: the weight's step, whose new fp32
    moments are written out once, then their requantization. As one graph, inductor recomputed each dequantized
    moment (a scalar lookup per element) in all three of its loops over the chunk (the update, the blocks' maxima,
    the codes): 14 -> 8 ns/element (8-bit) and 16 -> 12 (4-bit) on one AVX-512 core. Every lookup's index is in
    range by construction (a clamped bucket, a code <= the last threshold's index, a uint8 or 4-bit code), so
    inductor's bounds checks are off."""
    options = {"assert_indirect_indexing": False}
    parts = tuple(
        torch.compile(f, fullgraph=True, dynamic=False, options=options) for f in (_step_weight, _store_moments)
    )
    return functools.partial(update, parts=parts)
