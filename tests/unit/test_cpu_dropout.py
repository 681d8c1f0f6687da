"""CPU dropout (`cpu_dropout.CPUDropout`): drops with probability p, unbiased, backward through the same mask,
seeded by torch's generator (so resume is exact), identity in eval; the attention function computes SDPA's
attention (padding, causal, GQA) and drops attention probabilities the same way; the trainer's model preparation
swaps both in on a CPU unless `speed.cpu_dropout: off`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_BERT, base_overrides
from torch import nn

from fulltune.config import load_config
from fulltune.model.prepare import prepare_model
from fulltune.speed.cpu_dropout import ATTENTION, CPUDropout, attention, use_cpu_dropout


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


@pytest.mark.parametrize("setting,expected", [("auto", CPUDropout), ("off", nn.Dropout)])
def test_model_preparation_swaps_dropout_on_cpu(tmp_path, setting: str, expected: type) -> None:
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_BERT, speed__cpu_dropout=setting))
    _, model, _ = prepare_model(cfg, "text_classification", ["neg", "pos"], torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert layers and all(type(m) is expected for m in layers)
    assert model.config._attn_implementation == (ATTENTION if setting == "auto" else "sdpa")
    reference = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Dropout(0.0))
    keys = list(reference.state_dict())
    assert use_cpu_dropout(reference) == 1 and list(reference.state_dict()) == keys  # no state of its own
    assert type(reference[1]) is CPUDropout and reference[1].p == 0.2 and type(reference[2]) is nn.Dropout


class _Attn(nn.Module):
    def __init__(self, groups: int = 1, causal: bool = False) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def _sdpa_reference(q, k, v, mask, causal, groups):
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


@pytest.mark.parametrize("case", ["padding", "causal", "gqa", "float-mask"])
def test_attention_is_sdpa_attention_with_the_cpu_masks(case: str) -> None:
    torch.manual_seed(0)
    groups, causal = (2, True) if case == "gqa" else (1, case == "causal")
    q = torch.randn(3, 4, 6, 8, requires_grad=True)
    k = torch.randn(3, 4 // groups, 6, 8, requires_grad=True)
    v = torch.randn(3, 4 // groups, 6, 8, requires_grad=True)
    mask = None
    if case == "padding":
        mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
        mask[0, ..., 4:] = False  # the first example's last two tokens are padding
    elif case == "float-mask":
        mask = torch.zeros(3, 1, 6, 6)
        mask[1, ..., :2] = torch.finfo(torch.float32).min
    module = _Attn(groups, causal)
    expected = _sdpa_reference(q, k, v, mask, causal, groups)
    # Dropout too small to drop anything (round(p * 2**16) == 0): the custom path runs, masks scale by exactly 1.
    out, weights = attention(module, q, k, v, mask, dropout=1e-9, scaling=None)
    assert weights is None and out.shape == (3, 6, 4, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_attention_drops_probabilities_and_passes_the_rest_to_sdpa() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 4, 32, 16) for _ in range(3))
    ones = torch.ones_like(v)
    module = _Attn()
    # With v all ones each output element is the sum of its row's kept probabilities, times the keep scale.
    rows, _ = attention(module, q, k, ones, None, dropout=0.5)
    assert not torch.allclose(rows, torch.ones_like(rows))  # something was dropped
    assert abs(rows.mean().item() - 1.0) < 0.02  # unbiased: E[sum of kept p / (1 - 0.5)] = 1
    torch.manual_seed(5)
    first, _ = attention(module, q, k, v, None, dropout=0.1)
    torch.manual_seed(5)
    assert torch.equal(attention(module, q, k, v, None, dropout=0.1)[0], first)  # seeded by torch's generator
    plain = attention(module, q, k, v, None, dropout=0.0)[0]  # no dropout (evaluation): transformers' SDPA
    torch.testing.assert_close(plain, _sdpa_reference(q, k, v, None, False, 1))


def test_cpu_attention_on_clips_vision_tower_says_nothing_of_undefined_behavior() -> None:
    """An image classifier holds CLIP's text_config but no text model: only the configs a module runs switch."""
    import logging

    from transformers import CLIPConfig, CLIPForImageClassification
    from transformers.utils import logging as hf_logging

    from fulltune.speed.cpu_dropout import use_cpu_attention

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = vision | {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    cfg = CLIPConfig(projection_dim=16, vision_config=vision | {"image_size": 32, "patch_size": 16}, text_config=text)
    model = CLIPForImageClassification(cfg)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        assert use_cpu_attention(model)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [m for m in seen if "undefined behavior" in m], seen
    assert model.config.vision_config._attn_implementation == ATTENTION
