"""Fused q/k/v projections (`qkv.fuse_qkv`): the same outputs and gradients as three products, the same parameters
and state dict, projections with different inputs (cross-attention) or wrapped ones left as they were; the trainer's
model preparation fuses on a CPU unless `speed.fused_qkv: off`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_BERT, base_overrides
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fulltune.config import load_config
from fulltune.model.prepare import prepare_model
from fulltune.speed.qkv import QKVLinear, fuse_qkv


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _bert() -> nn.Module:
    cfg = BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, num_labels=3
    )
    return BertForSequenceClassification(cfg).eval()  # eval: no dropout, so both models draw nothing


def _llama() -> nn.Module:  # grouped-query attention: k and v are narrower than q, and no biases
    cfg = LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [_bert, _llama])
def test_same_outputs_gradients_and_state_dict(build) -> None:
    torch.manual_seed(0)
    plain = build()
    fused = copy.deepcopy(plain)
    keys, params = list(fused.state_dict()), dict(fused.named_parameters())
    assert fuse_qkv(fused) == 2
    assert list(fused.state_dict()) == keys and all(p is params[n] for n, p in fused.named_parameters())
    assert sum(type(m) is QKVLinear for m in fused.modules()) == 6
    ids = torch.randint(0, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.tensor([0, 2, 1]) if isinstance(plain, BertForSequenceClassification) else ids
    outs = [m(input_ids=ids, attention_mask=mask, labels=labels) for m in (plain, fused)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    want, got = _grads(plain), _grads(fused)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's bf16 path: the same casts, one product
        pair = [m(input_ids=ids, attention_mask=mask).logits.float() for m in (plain, fused)]
    torch.testing.assert_close(pair[1], pair[0], atol=0.05, rtol=0.05)


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.query(x) @ (self.key(memory) * self.value(memory)).transpose(1, 2)


def test_different_inputs_turn_the_group_back_into_three_products() -> None:
    torch.manual_seed(0)
    plain = _CrossAttention()
    fused = copy.deepcopy(plain)
    assert fuse_qkv(fused) == 1
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    for _ in range(3):  # the first call fuses, finds k and v asked for another input, and stops fusing
        torch.testing.assert_close(fused(x, memory), plain(x, memory))
    assert not fused.query.qkv_group.fused


def test_wrapped_or_mismatched_projections_are_left_alone() -> None:
    odd = _CrossAttention()
    odd.value = nn.Linear(8, 8, bias=False)  # one without a bias
    assert fuse_qkv(odd) == 0 and type(odd.query) is nn.Linear

    class Wrapped(nn.Linear):  # (as LoRA or a quantised layer would be)
        pass

    wrapped = _CrossAttention()
    wrapped.key = Wrapped(8, 8)
    assert fuse_qkv(wrapped) == 0


@pytest.mark.parametrize("setting,fused", [("auto", True), ("off", False)])
def test_model_preparation_fuses_on_cpu(tmp_path, setting: str, fused: bool) -> None:
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_BERT, speed__fused_qkv=setting))
    _, model, _ = prepare_model(cfg, "text_classification", ["neg", "pos"], torch.device("cpu"))
    assert any(type(m) is QKVLinear for m in model.modules()) == fused
