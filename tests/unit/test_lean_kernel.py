"""BF16AdamW's compiled update (training/lean_kernel.py): the kernel torch.compile builds gives the eager function's
bits exactly, the bits are uniform enough for unbiased rounding, training with it follows fp32 AdamW like the eager
update does, and a resume is bit-identical. One compiled variant (the lean default: bf16 moments, stochastic
rounding) keeps the build time down; the others are checked eagerly against the eager optimizer's math."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lean_optimizer import step_beside_fp32_adamw
from torch import nn

from fulltune.training.lean import BF16AdamW
from fulltune.training.lean_kernel import (
    compiled_update,
    random_bits,
    random_bits_inplace,
    update_lowp,
    update_lowp_,
)


def chunk(n: int, seed: int, v_dtype: torch.dtype = torch.bfloat16, kahan: bool = False):
    g = torch.Generator().manual_seed(seed)
    p, grad = torch.randn(n, generator=g).bfloat16(), (torch.randn(n, generator=g) * 1e-2).bfloat16()
    m = (torch.randn(n, generator=g) * 1e-3).bfloat16()
    v = (torch.rand(n, generator=g) * 1e-4).to(v_dtype)
    comp = (torch.randn(n, generator=g) * 1e-5).bfloat16() if kahan else None
    hp = torch.tensor([0.9, 0.999, 1e-8, 1e-3 * 0.01, 1e-3 / (1 - 0.9**3), (1 - 0.999**3) ** 0.5])
    return p, grad, m, v, comp, hp


def test_random_bits_are_uniform_and_depend_on_seed_and_position():
    bits = random_bits(1 << 16, torch.tensor(0, dtype=torch.int32), torch.tensor(7, dtype=torch.int32), "cpu")
    again = random_bits(1 << 15, torch.tensor(1 << 15, dtype=torch.int32), torch.tensor(7, dtype=torch.int32), "cpu")
    assert torch.equal(bits[1 << 15 :], again)  # a chunk's bits depend on the element's index, not the chunking
    other = random_bits(1 << 16, torch.tensor(0, dtype=torch.int32), torch.tensor(8, dtype=torch.int32), "cpu")
    assert (bits != other).float().mean() > 0.99
    for shift in (0, 7, 15):  # the three 16-bit windows the update uses
        window = ((bits >> shift) & 0xFFFF).float() / 65536
        assert abs(window.mean().item() - 0.5) < 0.01 and abs(window.var().item() - 1 / 12) < 0.002


def test_eager_bits_equal_the_kernel_bits_and_chunking_changes_nothing():
    for seed, start, n in ((7, 0, 1000), (-(1 << 31), 12345, 77), ((1 << 31) - 1, 5, 300)):
        want = random_bits(n, torch.tensor(start, dtype=torch.int32), torch.tensor(seed, dtype=torch.int32), "cpu")
        assert torch.equal(random_bits_inplace(n, start, seed, "cpu"), want)
    results = []
    for chunk_size in (None, 100, 999):  # eager bf16 stochastic updates, whole tensors or chunked
        model = mlp()
        opt = BF16AdamW(model.parameters(), lr=1e-3, state_dtype="bf16", rounding="stochastic", chunk_size=chunk_size)
        train(model, opt, 3)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_stochastic_rounding_is_unbiased():
    x = torch.full((1 << 16,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 value (1 + 2**-7)
    p, grad, m, v, _, hp = chunk(1 << 16, 0)
    bits = random_bits(x.numel(), torch.tensor(0, dtype=torch.int32), torch.tensor(3, dtype=torch.int32), "cpu")
    from fulltune.training.lean_kernel import round_bf16

    rounded = round_bf16(x, bits, 15).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - x[0].item()) < 2**-7 * 0.01


@pytest.mark.parametrize(
    ("v_dtype", "rounding"), [(torch.bfloat16, "stochastic"), (torch.float32, "kahan"), (torch.bfloat16, "nearest")]
)
def test_eager_kernel_matches_the_eager_optimizer_math(v_dtype, rounding):
    """The kernel's fp32 result (before rounding) is AdamW's: compare with nearest-rounded eager BF16AdamW."""
    p, grad, m, v, comp, hp = chunk(4096, 1, v_dtype, kahan=rounding == "kahan")
    new_p, new_m, new_v, new_c = update_lowp(
        p, grad, m, v, comp, hp, torch.tensor(5, dtype=torch.int32), torch.tensor(0, dtype=torch.int32), rounding
    )
    m32 = m.float() * 0.9 + grad.float() * 0.1
    v32 = v.float() * 0.999 + 0.001 * grad.float() ** 2
    b1, b2, eps, lr_wd, step_size, bc2 = hp.tolist()
    target = p.float() - step_size * m32 / (v32.sqrt() / bc2 + eps) - lr_wd * p.float()
    if comp is not None:
        target = target + comp.float()
        torch.testing.assert_close(new_p.float() + new_c.float(), target, rtol=2**-14, atol=1e-7)
    ulp = 2**-7 * target.abs().clamp_min(1e-30)
    assert ((new_p.float() - target).abs() <= ulp).all()
    torch.testing.assert_close(new_m.float(), m32, rtol=2**-7, atol=1e-9)
    assert new_v.dtype == v_dtype


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)).bfloat16()


@pytest.mark.parametrize(("n", "rounding"), [(3000, "stochastic"), (64, "stochastic"), (3000, "kahan")])
def test_compiled_kernel_equals_eager_bit_for_bit(n, rounding):
    """The compiled in-place update writes exactly the eager function's bits into the buffers it was given (Kahan:
    the compensation too; inductor once folded the weight's bf16 round trip away and left it at zero)."""
    kahan = rounding == "kahan"
    p, grad, m, v, comp, hp = chunk(n, 2, torch.float32 if kahan else torch.bfloat16, kahan=kahan)
    rest = (hp, torch.tensor(11, dtype=torch.int32), torch.tensor(64, dtype=torch.int32), rounding)
    expected = [t for t in update_lowp(p, grad, m, v, comp, *rest) if t is not None]
    bufs = [t.clone() for t in (p, m, v, comp) if t is not None]
    compiled_update()(bufs[0], grad, bufs[1], bufs[2], bufs[3] if kahan else None, *rest)
    for want, got in zip(expected, bufs, strict=True):
        assert torch.equal(want, got)
    if kahan:
        assert bufs[3].abs().max() > 0  # the rounding residual is kept
    eager = [t.clone() for t in (p, m, v, comp) if t is not None]
    update_lowp_(eager[0], grad, eager[1], eager[2], eager[3] if kahan else None, *rest)
    assert all(torch.equal(a, b) for a, b in zip(eager, bufs, strict=True))


def train(model, opt, steps, start=0):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 16, generator=g) for _ in range(steps + start)]
    for x in xs[start:]:
        model(x.bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def distance_to_fp32_adamw(compiled: bool) -> float:
    model = mlp()
    opt = BF16AdamW(
        model.parameters(),
        lr=1e-3,
        weight_decay=0.01,
        state_dtype="bf16",
        rounding="stochastic",
        compiled=compiled,
        chunk_size=1000,
    )
    ref = step_beside_fp32_adamw(model, opt)
    assert opt.compiled == compiled  # the kernel built (else it would have fallen back to eager, with a warning)
    diffs = torch.cat([(p.float() - r).flatten() for p, r in zip(model.parameters(), ref.parameters(), strict=True)])
    assert abs(diffs.mean().item()) < 1e-4  # unbiased: the rounding errors cancel on average
    return diffs.norm().item()


def test_compiled_optimizer_tracks_fp32_adamw_and_resumes_bit_exactly():
    # stochastic rounding puts each bf16 weight within a few ulps of the fp32 trajectory, as the eager update does
    assert distance_to_fp32_adamw(True) < 1.5 * distance_to_fp32_adamw(False)

    straight, first = mlp(), mlp()
    kw = dict(lr=1e-3, state_dtype="bf16", rounding="stochastic", compiled=True, seed=3)
    train(straight, BF16AdamW(straight.parameters(), **kw), 6)
    opt = BF16AdamW(first.parameters(), **kw)
    train(first, opt, 3)
    resumed = copy.deepcopy(first)
    opt2 = BF16AdamW(resumed.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(resumed, opt2, 3, start=3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
