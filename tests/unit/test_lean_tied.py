"""Lean mode's fused step of a tied embedding/head weight in vocabulary chunks (training/lean_tied.py): the weights
and optimizer states equal the plain per-tensor step's (BF16AdamW, 8- and 4-bit moments), no [vocab, hidden]
tensor is made during backward, and where the chunked step does not apply the plain one runs and the log says why."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.training import lean_tied
from fulltune.training.lean import BF16AdamW
from fulltune.training.lean_fused import attach_fused_step

VOCAB, HIDDEN = 1000, 256  # a row is one 256-element block of 8-bit moments, two of 4-bit ones


def tied_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(3)]
    out[1][0, :5] = torch.tensor([5, 6, 7, 5, 3])  # consecutive ids, a repeated one, the padding id
    out[2][1, -2:] = torch.tensor([0, VOCAB - 1])  # the first and the last row
    return out


def optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "bf16":
        return BF16AdamW(model.parameters(), lr=1e-3, state_dtype="bf16", rounding="stochastic")
    pytest.importorskip("torchao")
    from fulltune.training.lowbit import LowBitAdamW

    return LowBitAdamW(model.parameters(), lr=1e-3, bits=int(kind), stochastic_round=False)


def same_state(a: dict, b: dict) -> bool:
    def parts(t: object) -> list:
        return [t.codes, t.scale] if hasattr(t, "codes") else [torch.as_tensor(t)]

    return all(torch.equal(x, y) for k in a for x, y in zip(parts(a[k]), parts(b[k]), strict=True))


@pytest.mark.parametrize("kind", ["bf16", "8", "4"])
def test_chunked_tied_step_equals_the_plain_step(kind, monkeypatch) -> None:
    # 64 rows per chunk: 16 chunks, so input rows fall inside chunks and at their edges
    monkeypatch.setattr(lean_tied, "CHUNK_ELEMENTS", 64 * HIDDEN)
    chunked, plain = tied_llama(), tied_llama()
    opt, plain_opt = optimizer(kind, chunked), optimizer(kind, plain)
    handle = attach_fused_step(chunked, opt)
    assert handle.tied is not None and "vocabulary chunks" in handle.tied_note
    for ids in batches():
        chunked(input_ids=ids, labels=ids).loss.backward()
        plain(input_ids=ids, labels=ids).loss.backward()
        plain_opt.step()  # the same per-tensor update, from whole gradients
        plain_opt.zero_grad(set_to_none=True)
    assert handle.step_count == 3 and not handle.nonfinite()
    assert handle.param_updates == 3 * len(list(chunked.parameters()))  # the tied weight once per step
    # bit-identical: each row's gradient is the same matrix product row and the same lookup sum as autograd's,
    # and the update is elementwise (8/4-bit: whole blocks; bf16: rounding bits by element index)
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        assert a.grad is None and torch.equal(a, b), name
        assert same_state(opt.state[a], plain_opt.state[b]), name
    handle.remove()
    ids = batches()[0]
    chunked(input_ids=ids, labels=ids).loss.backward()  # the modules' own forward again: a whole gradient
    assert chunked.lm_head.weight.grad.shape == (VOCAB, HIDDEN)


class LargestOutput(TorchDispatchMode):
    """The most elements of any new tensor an operator returns while active (views and in-place results, which
    share an input's memory, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, tuple | list) else [out]
        for t, schema in zip(results, func._schema.returns, strict=False):
            if isinstance(t, torch.Tensor) and schema.alias_info is None:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_no_vocab_by_hidden_gradient_in_backward(chunked, monkeypatch) -> None:
    monkeypatch.setattr(lean_tied, "CHUNK_ELEMENTS", 64 * HIDDEN)
    model = tied_llama()
    opt = BF16AdamW(model.parameters(), lr=1e-3, state_dtype="bf16", rounding="stochastic")
    # max_grad_norm clips by each tensor's whole norm: the plain step, which holds the tied weight's whole gradient
    handle = attach_fused_step(model, opt, per_param_max_norm=None if chunked else 1.0)
    assert (handle.tied is not None) == chunked
    assert chunked or "whole gradient is held" in handle.tied_note
    first, ids = batches()[:2]
    model(input_ids=first, labels=first).loss.backward()  # the optimizer's moments are made in the first step
    loss = model(input_ids=ids, labels=ids).loss
    with LargestOutput() as mode:
        loss.backward()
    dense = VOCAB * HIDDEN
    # chunked: the largest new tensor is an update temporary of a 256 x 256 projection (65,536 elements)
    assert (mode.largest < dense // 2) == chunked, mode.largest


def test_the_log_line_says_how_the_tied_weight_steps() -> None:
    from fulltune.config import TrainingConfig
    from fulltune.training.lean_fused import describe_lean_mode

    model = tied_llama()
    handle = attach_fused_step(model, BF16AdamW(model.parameters()))
    line = describe_lean_mode(TrainingConfig(memory="lean"), torch.device("cpu"), handle)
    assert "tied embedding is stepped in vocabulary chunks" in line


def test_lookup_output_that_misses_the_loss_still_steps_every_row_once() -> None:
    # inputs_embeds built from the lookup but detached: the lookup's backward never comes, so its rows take their
    # head gradient alone at the end of backward, as the plain step would (its lookup part is zero)
    chunked, plain = tied_llama(), tied_llama()
    opt, plain_opt = optimizer("bf16", chunked), optimizer("bf16", plain)
    handle = attach_fused_step(chunked, opt)
    ids = batches()[0]
    for model in (chunked, plain):
        embeds = model.model.embed_tokens(ids).detach()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    plain_opt.step()
    assert handle.step_count == 1
    assert torch.equal(chunked.lm_head.weight, plain.lm_head.weight)
    assert opt.state[chunked.lm_head.weight]["step"] == 1


def test_plan_prices_the_chunked_tied_step(tmp_path) -> None:
    from conftest import base_overrides

    from fulltune import planning as plan
    from fulltune.config import load_config

    tiny = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 8192,
        "tie_word_embeddings": True,
    }

    def facts(**extra: object) -> plan.Facts:
        values = base_overrides(tmp_path, tiny, task="causal_lm", training__memory="lean", **extra)
        return plan.inspect_model(load_config(None, values), "causal_lm", None)

    # the planner asks the trainer's question (lean_tied.tied_step_blocker): clipping per tensor holds it whole
    assert facts().largest_fused_gradient == 0 and facts().largest_trainable == 8192 * 256
    assert facts(training__max_grad_norm=None).largest_fused_gradient == (1 << 20)  # a chunk of 4096 rows
