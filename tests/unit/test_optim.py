"""Optimizer pieces on their own: the learning-rate schedule's shape, and the shared optimizer step (clip, step,
free) against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fulltune.training.optim import grad_norm, lr_factor, optimizer_step, set_lr


def test_warmup_then_cosine_and_linear() -> None:
    total, warm = 10, 2
    assert [lr_factor(s, total, warm, "cosine") for s in range(2)] == pytest.approx([1 / 3, 2 / 3])
    assert lr_factor(warm, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(6, total, warm, "linear") == pytest.approx(0.5)
    assert lr_factor(total, total, warm, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, total, 0, "constant") == 1.0


def test_schedule_multiplies_each_groups_scale() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
    set_lr(opt, 1e-3, 0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 2e-4])
    assert opt.param_groups[0]["lr_scale"] == 0.5  # never overwritten


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW clips inside its kernel (grad_scale)
def test_optimizer_step_clips_steps_and_frees_like_plain_torch(fused: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    # eps=1: the update depends on the gradients' scale, so a wrong clipping factor shows
    opts = [
        torch.optim.AdamW(m.parameters(), lr=0.1, eps=1.0, fused=f or None)
        for m, f in ((model, fused), (reference, False))
    ]
    for m in (model, reference):
        (m(x) * 100).square().sum().backward()
    norm = optimizer_step(model, opts[0], max_grad_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opts[1].step()
    assert norm is not None and float(norm) == pytest.approx(float(expected)) and float(norm) > 1.0
    assert all(p.grad is None for p in model.parameters()) and getattr(opts[0], "grad_scale", None) is None
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert optimizer_step(model, opts[0]) is None  # nothing clips: no norm


def test_grad_norm_matches_torch_and_keeps_nonfinite() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(300, 7), torch.randn(11), torch.randn(2, 3, 4).transpose(0, 2)]  # a non-contiguous one too
    expected = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(grad_norm(grads), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_norm([g.bfloat16() for g in grads]), expected.bfloat16(), rtol=1e-2, atol=0)
    assert not torch.isfinite(grad_norm([*grads, torch.tensor([float("inf")])]))
    assert torch.isnan(grad_norm([*grads, torch.tensor([float("nan")])]))
