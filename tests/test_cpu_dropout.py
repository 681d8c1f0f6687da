"""CPU dropout (`cpu_dropout.CPUDropout`): drops with probability p, unbiased, backward through the same mask,
seeded by torch's generator (so resume is exact), identity in eval; the trainer's model preparation swaps it in
on a CPU unless `hardware.cpu_dropout: torch`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_BERT, base_overrides
from torch import nn

from fulltune.config import load_config
from fulltune.cpu_dropout import CPUDropout, use_cpu_dropout
from fulltune.methods import prepare_model


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_scale_and_backward(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.rand(200, 501) + 0.5).to(dtype).requires_grad_()  # an odd element count: the last draw is partial
    y = CPUDropout(p).train()(x)
    dropped = (y == 0).double().mean().item()
    n = x.numel()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)  # five standard errors
    scale = 2**16 / (2**16 - round(p * 2**16))
    kept = y != 0
    torch.testing.assert_close(y[kept], (x * scale)[kept])  # kept elements scaled as x * scale is rounded
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).to(dtype) * scale)  # the gradient flows through the same mask
    assert abs(y.double().mean().item() - x.double().mean().item()) < 0.01  # unbiased


def test_seeded_like_torch_and_identity_where_it_should_be() -> None:
    layer = CPUDropout(0.1).train()
    x = torch.randn(4, 7, 9)
    torch.manual_seed(3)
    first = layer(x)
    state = torch.get_rng_state()
    second = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)  # the default generator decides: seeding repeats the mask
    torch.set_rng_state(state)
    assert torch.equal(layer(x), second)  # and a restored generator state resumes it exactly
    assert not torch.equal(first, second)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)
    assert torch.equal(CPUDropout(1.0).train()(x), torch.zeros_like(x))
    inplace = x.clone()
    CPUDropout(0.5, inplace=True).train()(inplace)  # torch's own in-place dropout
    assert (inplace == 0).any()


@pytest.mark.parametrize("setting,expected", [("auto", CPUDropout), ("torch", nn.Dropout)])
def test_model_preparation_swaps_dropout_on_cpu(tmp_path, setting: str, expected: type) -> None:
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_BERT, hardware__cpu_dropout=setting))
    _, model, _ = prepare_model(cfg, "text_classification", ["neg", "pos"], torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert layers and all(type(m) is expected for m in layers)
    reference = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Dropout(0.0))
    keys = list(reference.state_dict())
    assert use_cpu_dropout(reference) == 1 and list(reference.state_dict()) == keys  # no state of its own
    assert type(reference[1]) is CPUDropout and reference[1].p == 0.2 and type(reference[2]) is nn.Dropout
