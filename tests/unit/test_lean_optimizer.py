"""Lean mode's optimizer alone (no trainer): BF16AdamW tracks fp32 AdamW (Kahan keeps sub-ulp updates that plain
bf16 loses), the fused backward step equals step()+zero_grad() bit for bit and frees every gradient, its state
resumes bit-identically, and the fused step refuses what it cannot do (accumulation, global-norm clipping)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import TINY_BERT
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from fulltune.training.lean import BF16AdamW, build_lean_optimizer, lean_bytes_per_param
from fulltune.training.lean_fused import attach_fused_step


def mlp(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).to(dtype)


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # no dropout: the two training paths below must see identical forwards
    shape = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    cfg = BertConfig(**shape, vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).to(torch.bfloat16).train()  # word embeddings tied to the MLM decoder


def grouped(model: nn.Module, **kw: object) -> BF16AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # lr_scale is the scheduler's business: the optimizer must carry it and ignore it
    groups = [{"params": decay, "lr_scale": 0.5}, {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    return BF16AdamW(groups, lr=1e-3, weight_decay=0.01, **kw)


def bert_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def test_fp32_params_match_torch_adamw_exactly() -> None:
    a, b = mlp(torch.float32), mlp(torch.float32)
    oa = BF16AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, chunk_size=100)  # chunking must not matter
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def step_beside_fp32_adamw(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 8) -> nn.Module:
    """`steps` of `opt` on the bf16 `model`, and torch AdamW on an fp32 copy fed the same gradients; the copy."""
    ref = copy.deepcopy(model).float()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        model(x.bfloat16()).float().pow(2).mean().backward()
        for p, r in zip(model.parameters(), ref.parameters(), strict=True):
            r.grad = p.grad.float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
    return ref


@pytest.mark.parametrize("state_dtype", ["mixed", "fp32"])
def test_bf16_update_matches_fp32_adamw(state_dtype: str) -> None:
    """Same gradients (from the bf16 model) into BF16AdamW on bf16 weights and torch AdamW on an fp32 copy."""
    model = mlp()
    opt = BF16AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, state_dtype=state_dtype)
    ref = step_beside_fp32_adamw(model, opt)
    # weight + compensation carries ~16 significant bits of the fp32 trajectory; a bf16 exp_avg adds its own
    # rounding noise on top (~0.4% of an lr-sized step, per step)
    atol = 2e-6 if state_dtype == "fp32" else 5e-5
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        eff = p.float() + opt.state[p]["kahan_comp"].float()
        torch.testing.assert_close(eff, r, rtol=2**-14, atol=atol)
        # the stored weight is that trajectory rounded to bf16: within half an ulp (2**-8 relative bounds it)
        torch.testing.assert_close(p.float(), r, rtol=2**-8, atol=atol)


def test_kahan_keeps_updates_below_bf16_resolution() -> None:
    """Weights at 1.0 (bf16 ulp 2**-8 just below), lr 1e-5, constant gradient: Adam moves each weight by 1e-5 a
    step. Plain bf16 rounding drops every one of those; Kahan keeps them; the fp32 reference moves 1e-3."""
    results = {}
    for rounding in ("nearest", "kahan", "stochastic"):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = BF16AdamW([p], lr=1e-5, weight_decay=0.0, rounding=rounding)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        comp = opt.state[p].get("kahan_comp")
        results[rounding] = (p.float(), p.float() + (comp.float() if comp is not None else 0.0))
    ref = nn.Parameter(torch.ones(4096))
    ref_opt = torch.optim.AdamW([ref], lr=1e-5, weight_decay=0.0)
    for _ in range(100):
        ref.grad = torch.ones_like(ref)
        ref_opt.step()
    moved = 1.0 - ref.detach().mean().item()
    assert moved == pytest.approx(1e-3, rel=1e-2)
    stored, effective = results["nearest"]
    assert torch.all(stored == 1.0) and torch.all(effective == 1.0)  # every update lost
    stored, effective = results["kahan"]
    assert torch.all(stored == 1.0)  # still under half an ulp from 1.0, but kept in the compensation:
    # Adam's exact movement is 100 * lr; fp32 AdamW itself overshoots it by 0.14% (its own rounding at 1.0,
    # where an fp32 ulp is 0.6% of a step), Kahan's effective weight lands within 0.05% on average
    assert (1.0 - effective.mean().item()) == pytest.approx(100 * 1e-5, rel=1e-3)
    assert (1.0 - effective).std().item() < 0.02 * moved
    stored, _ = results["stochastic"]
    assert (1.0 - stored.mean().item()) == pytest.approx(moved, rel=0.1)  # right on average only


def test_kahan_weight_follows_fp32_over_many_small_steps() -> None:
    p = nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    opt = BF16AdamW([p], lr=1e-5, weight_decay=0.0)
    for _ in range(500):  # 5e-3 in total: the stored bf16 weight itself has to move, to bf16(0.995) = 1 - 2**-8
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.all(p == torch.tensor(0.995, dtype=torch.bfloat16)) and p[0].item() == 1 - 2**-8
    effective = p.float() + opt.state[p]["kahan_comp"].float()
    assert effective.mean().item() == pytest.approx(0.995, abs=2e-5)


def enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def run_bert(fused: bool, steps: int = 3, checkpointing: bool = False, **attach_kw: object):
    model = tiny_bert()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)  # a frozen parameter
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    opt = grouped(model, chunk_size=500)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # lr changes every step
    handle = attach_fused_step(model, opt, **attach_kw) if fused else None
    grads_after_backward = []
    for step in range(steps):
        model(**bert_batch(step)).loss.backward()
        if fused:
            grads_after_backward.append([n for n, p in model.named_parameters() if p.grad is not None])
        else:
            opt.step()
            opt.zero_grad()
        sched.step()
    return model, opt, handle, grads_after_backward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_backward_equals_step_path_and_frees_grads(checkpointing: bool) -> None:
    frozen_before = tiny_bert().bert.embeddings.position_embeddings.weight.clone()
    plain, _, _, _ = run_bert(fused=False)
    fused, _, handle, grads_after_backward = run_bert(fused=True, checkpointing=checkpointing)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(fused.bert.embeddings.position_embeddings.weight, frozen_before)
    assert grads_after_backward == [[], [], []]  # no parameter holds a .grad after any backward
    trainable = sum(1 for p in fused.parameters() if p.requires_grad)
    assert handle.step_count == 3 and handle.param_updates == 3 * trainable
    assert not handle.nonfinite()


def test_fused_per_param_clipping_equals_clipped_step_path() -> None:
    max_norm = 0.05
    fused, _, _, _ = run_bert(fused=True, per_param_max_norm=max_norm)
    model = tiny_bert()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    opt = grouped(model, chunk_size=500)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(3):
        model(**bert_batch(step)).loss.backward()
        for p in model.parameters():  # the documented substitute: each tensor clipped by its own norm
            if p.grad is not None:
                norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        opt.step()
        opt.zero_grad()
        sched.step()
    for a, b in zip(model.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_refuses_accumulation_and_global_clipping() -> None:
    model = mlp()
    opt = BF16AdamW(model.parameters())
    with pytest.raises(ValueError, match="accumulat"):
        attach_fused_step(model, opt, accumulation_steps=4)
    with pytest.raises(ValueError, match="global-norm"):
        attach_fused_step(model, opt, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="step_param"):
        attach_fused_step(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="missing from the optimizer"):
        attach_fused_step(model, BF16AdamW(list(model.parameters())[:2]))


def test_fused_refuses_reentrant_checkpointing() -> None:
    model = tiny_bert()
    enable_checkpointing(model, reentrant=True)  # inner backward passes would see partial gradients
    attach_fused_step(model, grouped(model))
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(**bert_batch(0)).loss.backward()


def test_fused_nonfinite_flag_and_remove() -> None:
    model = mlp()
    opt = BF16AdamW(model.parameters())
    handle = attach_fused_step(model, opt)
    with pytest.raises(RuntimeError, match="already"):
        attach_fused_step(model, opt)
    x = torch.randn(8, 16).bfloat16()
    model(x).float().sum().backward()
    assert not handle.nonfinite()
    x[0, 0] = float("nan")
    model(x).float().sum().backward()
    assert handle.nonfinite() and handle.step_count == 2
    handle.reset_nonfinite()
    assert not handle.nonfinite()
    handle.remove()
    model2 = mlp()
    handle2 = attach_fused_step(model2, BF16AdamW(model2.parameters()))
    handle2.remove()
    model2(torch.randn(8, 16).bfloat16()).float().sum().backward()
    assert all(p.grad is not None for p in model2.parameters())  # hooks gone: plain backward again
    assert handle2.step_count == 0


def train_steps(model: nn.Module, opt: BF16AdamW, batches: range) -> None:
    for step in batches:
        model(**bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("state_dtype", "rounding"), [("mixed", "kahan"), ("bf16", "stochastic")])
def test_state_dict_resume_is_bit_identical(state_dtype: str, rounding: str) -> None:
    straight = tiny_bert()
    opt = grouped(straight, state_dtype=state_dtype, rounding=rounding, seed=7)
    train_steps(straight, opt, range(6))

    first = tiny_bert()
    opt = grouped(first, state_dtype=state_dtype, rounding=rounding, seed=7)
    train_steps(first, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = tiny_bert(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = grouped(resumed, state_dtype=state_dtype, rounding=rounding, seed=0)  # seed comes back from the groups
    opt.load_state_dict(saved["optim"])
    assert opt.param_groups[0]["lr_scale"] == 0.5
    p0 = opt.param_groups[0]["params"][0]
    assert opt.state[p0]["exp_avg_sq"].dtype == (torch.float32 if state_dtype == "mixed" else torch.bfloat16)
    train_steps(resumed, opt, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bytes_per_param_and_builder() -> None:
    assert lean_bytes_per_param() == 10
    assert lean_bytes_per_param("bf16", "kahan") == 8
    assert lean_bytes_per_param("mixed", "stochastic") == 8
    model = mlp()
    assert isinstance(build_lean_optimizer(model.parameters(), lr=1e-4), BF16AdamW)
    with pytest.raises(ValueError, match="unknown"):
        build_lean_optimizer(model.parameters(), kind="sgd")
    with pytest.raises(ValueError, match="rounding"):
        BF16AdamW(model.parameters(), rounding="up")
    with pytest.raises(ValueError, match="low-bit"):
        build_lean_optimizer(model.parameters(), kind="adamw8bit")


@pytest.mark.gpu
def test_bf16_adamw_on_cuda_matches_cpu() -> None:
    model = mlp()
    cuda = copy.deepcopy(model).cuda()
    opts = [BF16AdamW(m.parameters(), lr=1e-2, rounding="kahan") for m in (model, cuda)]
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    for m, opt, inp in ((model, opts[0], x), (cuda, opts[1], x.cuda())):
        for _ in range(3):
            m(inp).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), cuda.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b.float().cpu(), atol=2e-2, rtol=2e-2)
