"""A first-token classifier's last layer for the first token only (`first_token.first_token_layer`): the same logits
and gradients as the full layer (BERT and RoBERTa, SDPA and eager attention, padded batches, fused q/k/v), the same
state dict, the full layer back where hidden states are asked for or after `all_tokens`; models whose heads read
other positions are left alone; the trainer's preparation applies it to text classification unless
`speed.first_token_only: off` or lean mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_BERT, base_overrides
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from fulltune.config import load_config
from fulltune.model.prepare import prepare_model
from fulltune.speed.cpu_dropout import use_cpu_dropout
from fulltune.speed.first_token import all_tokens, first_token_layer
from fulltune.speed.plan import describe
from fulltune.speed.qkv import fuse_qkv

SIZES = dict(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padded rows: the first token must not attend to padding
    mask[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def _last_class(model: nn.Module) -> str:
    return type(model.base_model.encoder.layer[-1]).__name__


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "config_class,model_class",
    [(BertConfig, BertForSequenceClassification), (RobertaConfig, RobertaForSequenceClassification)],
)
def test_same_logits_and_gradients(attention: str, config_class, model_class) -> None:
    torch.manual_seed(0)
    config = config_class(**SIZES, num_labels=3, max_position_embeddings=40, attn_implementation=attention)
    full = model_class(config).eval()  # eval: no dropout, so both draw nothing
    first = copy.deepcopy(full)
    fuse_qkv(first)  # the last layer computes its projections on their own; the layers below stay fused
    assert first_token_layer(first) and _last_class(first).startswith("FirstToken")
    out_full, out_first = full(**_batch()), first(**_batch())
    torch.testing.assert_close(out_first.logits, out_full.logits, rtol=1e-5, atol=1e-7)
    out_full.loss.backward()
    out_first.loss.backward()
    grads = {n: p.grad for n, p in first.named_parameters() if p.grad is not None}
    for name, p in full.named_parameters():
        if p.grad is None:
            assert name not in grads
            continue
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert first.state_dict().keys() == full.state_dict().keys()
    all_tokens(first)
    assert _last_class(first) == _last_class(full)


def test_hidden_states_asked_for_take_the_full_layer() -> None:
    model = BertForSequenceClassification(BertConfig(**SIZES, num_labels=2)).eval()
    first_token_layer(model)
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    assert model.bert(**batch).last_hidden_state.shape[1] == 1  # the layer's own output: the first token
    out = model(**batch, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == 11


def test_training_mode_with_fulltune_cpu_attention_and_dropout() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SIZES, num_labels=3)).train()
    use_cpu_dropout(model)
    fuse_qkv(model)
    first_token_layer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "build",
    [
        lambda: BertForTokenClassification(BertConfig(**SIZES, num_labels=3)),  # a label per token
        lambda: LlamaForSequenceClassification(LlamaConfig(**SIZES, num_labels=3)),  # reads the last real token
        lambda: BertForSequenceClassification(BertConfig(**SIZES, num_labels=3, chunk_size_feed_forward=4)),
    ],
)
def test_other_models_left_alone(build) -> None:
    model = build()
    before = [type(m) for m in model.modules()]
    assert not first_token_layer(model)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize(
    "extra,applied",
    [({}, True), ({"speed__first_token_only": "off"}, False), ({"training__memory": "lean"}, False)],
)
def test_model_preparation(tmp_path, extra: dict, applied: bool) -> None:
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_BERT, **extra))
    bundle, model, _ = prepare_model(cfg, "text_classification", ["neg", "pos"], torch.device("cpu"))
    assert _last_class(model).startswith("FirstToken") == applied
    assert bundle.speed.plan.on("first_token_only") == applied
    assert ("last layer for the first token only" in describe(bundle.speed.plan)) == applied  # the run header's line
