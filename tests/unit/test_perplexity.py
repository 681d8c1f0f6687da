"""Perplexity (blocks and sliding window) against an independent PyTorch reference, and file tokenisation."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, config_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fulltune.config import DataConfig  # noqa: E402
from fulltune.data import lm  # noqa: E402
from fulltune.eval.perplexity import iter_windows, perplexity  # noqa: E402

N_TOKENS = 203  # not a multiple of the block size below
BLOCK = 32


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**config_kwargs(TINY_LLAMA, vocab_size=100))
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (N_TOKENS,), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _reference_blocks(model, ids, block):
    nll, n = 0.0, 0
    for s in range(0, len(ids), block):
        chunk = ids[s : s + block]
        if len(chunk) < 2:
            continue
        logits = model(chunk[None]).logits[0]
        nll += F.cross_entropy(logits[:-1].double(), chunk[1:], reduction="sum").item()
        n += len(chunk) - 1
    return nll / n, n


@torch.no_grad()
def _reference_sliding(model, ids, block, stride):
    # the Hugging Face perplexity guide: labels of already-scored tokens set to -100
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + block, len(ids))
        trg_len = end - prev_end
        inp = ids[begin:end]
        labels = inp.clone()
        labels[:-trg_len] = -100
        logits = model(inp[None]).logits[0]
        shift_labels = labels[1:]
        nll += F.cross_entropy(logits[:-1].double(), shift_labels, ignore_index=-100, reduction="sum").item()
        n += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll / n, n


@pytest.mark.parametrize("batch_size", [1, 3])
def test_blocks_match_reference(model, ids, batch_size):
    ref_nll, ref_n = _reference_blocks(model, ids, BLOCK)
    out = perplexity(model, ids, BLOCK, batch_size=batch_size)
    assert out["method"] == "blocks" and out["block_size"] == BLOCK and out["stride"] == BLOCK
    # 7 blocks (6 full + an 11-token tail); the first token of each has no context
    assert out["tokens"] == ref_n == N_TOKENS - math.ceil(N_TOKENS / BLOCK)
    assert out["nll"] == pytest.approx(ref_nll, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(ref_nll), rel=1e-4)


@pytest.mark.parametrize("stride,batch_size", [(12, 1), (12, 4), (31, 2)])
def test_sliding_window_matches_reference(model, ids, stride, batch_size):
    ref_nll, ref_n = _reference_sliding(model, ids, BLOCK, stride)
    out = perplexity(model, ids, BLOCK, stride=stride, batch_size=batch_size)
    assert out["method"] == "sliding_window" and out["stride"] == stride
    assert out["tokens"] == ref_n == N_TOKENS - 1  # every token but the first, once
    assert out["nll"] == pytest.approx(ref_nll, abs=1e-4)


def test_stride_equal_block_is_blocks(model, ids):
    a = perplexity(model, ids, BLOCK)
    b = perplexity(model, ids, BLOCK, stride=BLOCK)
    assert a == b


def test_sliding_windows_score_each_token_once():
    # the scheme itself, no model: each token 1..N-1 scored exactly once, always with >= 1 context token
    scored = []
    for w in iter_windows(N_TOKENS, BLOCK, 12):
        assert 1 <= w.score_from < w.length <= BLOCK
        scored += range(w.start + w.score_from, w.end)
    assert scored == list(range(1, N_TOKENS))


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError):
        perplexity(model, ids, BLOCK, stride=BLOCK + 1)
    with pytest.raises(ValueError):
        perplexity(model, ids[:1], BLOCK)
    with pytest.raises(ValueError):
        perplexity(model, ids[None], BLOCK)


def test_autocast_context(model, ids):
    ref = perplexity(model, ids, BLOCK, stride=16)
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        out = perplexity(model, ids, BLOCK, stride=16, autocast_ctx=ctx)
        assert out["tokens"] == N_TOKENS - 1
        assert out["nll"] == pytest.approx(ref["nll"], abs=0.05)  # bf16 matmuls: close, not equal


def test_model_mode_restored(model, ids):
    model.train()
    try:
        perplexity(model, ids[:40], BLOCK)
        assert model.training
    finally:
        model.eval()


def _tiny_tokenizer(corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_file_tokens_chunks_match_whole(tmp_path, monkeypatch):
    lines = []
    for i in range(200):
        lines.append(f"line {i} of the tiny corpus, with words and   spaces\n")
        if i % 7 == 0:
            lines.append("\n\n")  # blank-line runs must not be split between chunks
        if i % 11 == 0:
            lines.append("    indented continuation\r\n")
    text = "".join(lines)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    tok = _tiny_tokenizer(text)

    whole = tok(text.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(lm, "_CHUNK_CHARS", 300)  # many chunks
    ids, labels = lm.file_tokens(path, DataConfig(), tok)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0].item() == tok.bos_token_id and ids[-1].item() == tok.eos_token_id
    assert ids[1:-1].tolist() == whole
    assert labels[0].item() == lm.IGNORE and labels[1:].tolist() == ids[1:].tolist()
