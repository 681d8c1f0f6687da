"""LowBitAdamW (lean mode's 8- and 4-bit moments): its chunked per-tensor step against torchao's own AdamW8bit /
AdamW4bit, the fused step against step() after backward, and a state dict through safetensors + JSON that resumes
bit-identically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from fulltune.files.safestate import load_state, save_state  # noqa: E402
from fulltune.training.lean import lean_bytes_per_param  # noqa: E402
from fulltune.training.lean_fused import attach_fused_step  # noqa: E402
from fulltune.training.lowbit import BLOCK_SIZE, LowBitAdamW  # noqa: E402


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # 64 x 128 weights (8192 elements) get quantized moments; the biases (< 4096) plain ones
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64)).to(dtype)


def batch(i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 64, generator=g).to(dtype), torch.randn(8, 64, generator=g).to(dtype)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range, fused: bool = False) -> None:
    for i in steps:
        x, y = batch(i, next(model.parameters()).dtype)
        loss = (model(x) - y).float().pow(2).mean()
        loss.backward()
        if not fused:
            opt.step()
            opt.zero_grad(set_to_none=True)


def train_with_lr_changes(model: nn.Module, opt: torch.optim.Optimizer, lrs: list[float]) -> None:
    """Steps of `train_steps`, the learning rate changed before each (torchao's groups hold it as a tensor)."""
    for i, lr in enumerate(lrs):
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        train_steps(model, opt, range(i, i + 1))


@pytest.mark.parametrize(("bits", "dtype"), [(8, torch.float32), (4, torch.float32), (8, torch.bfloat16)])
def test_chunked_step_equals_torchao(bits, dtype, monkeypatch) -> None:
    from torchao.optim import AdamW4bit, AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from fulltune.training.lowbit import without_zero_code

    # torchao's step() always compiles its update (minutes on a busy CPU); the reference runs the same function eagerly
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def zeros8(p: torch.Tensor, signed: bool, block_size: int) -> OptimState8bit:
        moment = OptimState8bit.zeros(p.shape, signed, block_size, p.device, dtype=p.dtype)
        if not signed:  # the reference keeps the same 8-bit exp_avg_sq code book (no 0 code)
            without_zero_code(moment)
        return moment

    monkeypatch.setattr(AdamW8bit, "_subclass_zeros", staticmethod(zeros8))
    ours, ref = mlp(dtype), mlp(dtype)
    if dtype == torch.bfloat16:  # torchao keeps a small tensor's moments bf16 (ours: fp32): only weights train
        for model in (ours, ref):
            model[0].bias.requires_grad_(False)
            model[2].bias.requires_grad_(False)
    # bf16: rounded to nearest on both sides (stochastic rounding draws other bits: the next test)
    opt = LowBitAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, bits=bits, chunk_size=4096, stochastic_round=False)
    ref_opt = (AdamW8bit if bits == 8 else AdamW4bit)(
        ref.parameters(), lr=1e-2, weight_decay=0.1, block_size=BLOCK_SIZE[bits]
    )
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]
    torch.manual_seed(3)
    train_with_lr_changes(ours, opt, lrs)
    torch.manual_seed(3)
    train_with_lr_changes(ref, ref_opt, lrs)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    w = ours[0].weight
    assert type(opt.state[w]["exp_avg"]).__name__ == f"OptimState{bits}bit"
    assert opt.state[w]["exp_avg"].codes.numel() == w.numel() * bits // 8


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_of_bf16_weights_is_lean_modes(bits: int) -> None:
    """A bf16 weight rounds up or down from the update rounded to nearest, with the bits BF16AdamW uses (a hash of
    (group seed, parameter index, step) and the element's index): the same whatever the chunking, different per
    seed, no generator state read."""
    results = {}
    for name, chunk, seed, stochastic in [
        ("nearest", 4096, 0, False),
        ("whole", 1 << 20, 0, True),
        ("chunks", 4096, 0, True),
        ("other seed", 4096, 1, True),
    ]:
        model = mlp(torch.bfloat16)
        opt = LowBitAdamW(
            model.parameters(), lr=1e-2, bits=bits, chunk_size=chunk, seed=seed, stochastic_round=stochastic
        )
        torch.manual_seed(0)
        train_steps(model, opt, range(1))
        torch.manual_seed(123)  # the generator's state does not matter
        results[name] = model[0].weight.detach().float()
    assert torch.equal(results["whole"], results["chunks"])
    assert not torch.equal(results["whole"], results["other seed"])
    moved = results["whole"] != results["nearest"]
    assert 0.05 < moved.float().mean() < 0.95  # some round the other way, not all
    ulp = torch.finfo(torch.bfloat16).eps * results["nearest"].abs()
    assert ((results["whole"] - results["nearest"]).abs() <= ulp * 1.01).all()  # at most one bf16 step away


def test_8bit_moments_track_torch_adamw_on_gradients_of_wide_range() -> None:
    # Gradients whose magnitudes span 5 decades inside each 256-element block, as an embedding's or a head's do:
    # with a 0 code in exp_avg_sq's code book, elements with |g| < ~4e-4 of their block's largest got v = 0 and
    # an update of m / eps, hundreds of lr; 8-bit moments must stay at least as close to torch AdamW as 4-bit ones
    lr, steps = 1e-4, 4
    gen = torch.Generator().manual_seed(0)
    decades = [torch.rand(64, 512, generator=gen).mul(5) for _ in range(steps)]
    grads = [torch.randn(64, 512, generator=gen) * 10**-d for d in decades]
    moved = {}
    for name in ("torch", 8, 4):
        w = nn.Parameter(torch.zeros(64, 512))
        if name == "torch":
            opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
        else:
            opt = LowBitAdamW([w], lr=lr, weight_decay=0.0, bits=name)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        moved[name] = w.detach().clone()
    err = {bits: (moved[bits] - moved["torch"]).abs() for bits in (8, 4)}
    assert err[8].max() < steps * lr  # no element far outside AdamW's step of about lr per step
    assert err[8].norm() <= err[4].norm()


def test_fused_step_equals_step_after_backward_with_groups() -> None:
    model = mlp(torch.bfloat16)
    fused_model = copy.deepcopy(model)

    def groups(m: nn.Module) -> list[dict]:
        return [
            {"params": [m[0].weight, m[2].weight], "lr": 2e-2, "weight_decay": 0.1},
            {"params": [m[0].bias, m[2].bias], "lr": 5e-3, "weight_decay": 0.0},
        ]

    opt = LowBitAdamW(groups(model), bits=4, stochastic_round=False)
    fused_opt = LowBitAdamW(groups(fused_model), bits=4, stochastic_round=False)
    handle = attach_fused_step(fused_model, fused_opt)
    train_steps(model, opt, range(3))
    train_steps(fused_model, fused_opt, range(3), fused=True)
    assert handle.step_count == 3
    for a, b in zip(model.parameters(), fused_model.parameters(), strict=True):
        assert b.grad is None and torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_through_safetensors_resumes_bit_identically(bits, tmp_path) -> None:
    straight = mlp(torch.bfloat16)
    resumed = copy.deepcopy(straight)
    opt = LowBitAdamW(straight.parameters(), lr=1e-2, bits=bits)  # stochastic rounding: the RNG state matters too
    torch.manual_seed(7)
    train_steps(straight, opt, range(3))
    save_state({"optim": opt.state_dict(), "rng": torch.get_rng_state()}, tmp_path, "s")
    weights = copy.deepcopy(straight.state_dict())
    train_steps(straight, opt, range(3, 6))

    resumed.load_state_dict(weights)
    saved = load_state(tmp_path, "s")
    assert saved["optim"]["state"][0]["exp_avg"]["codes"].dtype == torch.uint8
    opt2 = LowBitAdamW(resumed.parameters(), lr=1e-2, bits=bits)
    opt2.load_state_dict(saved["optim"])
    torch.set_rng_state(saved["rng"])
    train_steps(resumed, opt2, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_of_another_width_is_refused() -> None:
    model = mlp()
    opt8 = LowBitAdamW(model.parameters(), bits=8)
    train_steps(model, opt8, range(1))
    with pytest.raises(ValueError, match="8-bit state.*this run keeps 4-bit"):
        LowBitAdamW(model.parameters(), bits=4).load_state_dict(opt8.state_dict())


def test_bytes_per_param() -> None:
    assert lean_bytes_per_param(optimizer="adamw8bit") == pytest.approx(4.03125)
    assert lean_bytes_per_param(optimizer="adamw4bit") == pytest.approx(3.125)
    assert lean_bytes_per_param("bf16", "stochastic") == 6


@pytest.mark.slow
def test_compiled_update_tracks_the_eager_one() -> None:
    eager, compiled = mlp(torch.bfloat16), mlp(torch.bfloat16)
    opts = [
        LowBitAdamW(m.parameters(), lr=1e-2, bits=8, stochastic_round=False, compiled=c)
        for m, c in ((eager, False), (compiled, True))
    ]
    train_steps(eager, opts[0], range(2))
    train_steps(compiled, opts[1], range(2))
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_the_log_line_says_which_moments_and_where_the_step_runs() -> None:
    from fulltune.config import TrainingConfig
    from fulltune.training.lean_fused import describe_lean_mode

    cpu = torch.device("cpu")
    line = describe_lean_mode(TrainingConfig(memory="lean", lean_optimizer="adamw4bit"), cpu, fused=True)
    assert "torchao's 4-bit AdamW moments" in line and "fused into backward" in line
    paged = describe_lean_mode(TrainingConfig(memory="lean", lean_optimizer="paged_adamw8bit"), cpu, fused=False)
    assert "paged 8-bit" in paged and "no public per-tensor step" in paged


@pytest.mark.parametrize(("bits", "signed"), [(8, True), (8, False), (4, True), (4, False)])
def test_table_quantizer_gives_torchao_binary_search_codes(bits: int, signed: bool) -> None:
    """The CPU quantizer (a table on the value's float bits, training/lowbit_update.py) against torchao's search,
    on values of every magnitude, the code book's own values, the midpoints between codes and the ends."""
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from fulltune.training.lowbit import without_zero_code
    from fulltune.training.lowbit_update import code_table, encode, quantize

    state = (OptimState8bit if bits == 8 else OptimState4bit).zeros((4096,), signed, 256 if bits == 8 else 128)
    books = [state.qmap.clone()]
    if bits == 8 and not signed:
        without_zero_code(state)
        books.append(state.qmap)
    g = torch.Generator().manual_seed(0)
    for qmap in books:
        x = torch.rand(1 << 16, generator=g) * torch.exp(-25 * torch.rand(1 << 16, generator=g))
        if signed:
            x = x * torch.where(torch.rand(1 << 16, generator=g) < 0.5, -1.0, 1.0)
        mids = (qmap[1:] + qmap[:-1]) / 2
        edges = torch.tensor([0.0, -0.0, 1.0, -1.0 if signed else 1e-30, 1e-38])
        x = torch.cat(
            [x, qmap, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.ones(())), edges]
        )
        table = code_table(qmap)
        assert table is not None
        reference = (quantize_8bit_with_qmap if bits == 8 else quantize_4bit_with_qmap)(x, qmap)
        assert torch.equal(quantize(x, table.packed, table.lo), reference)
        assert torch.equal(encode(x, table.lookup, table.lo), reference)  # what the update calls (4-bit: compares)
