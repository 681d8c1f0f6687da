"""Perplexity of a causal LM: the one definition the training run's validation, `fulltune evaluate` and
`fulltune prune` all use.

- Tokens: the file's records framed as training frames them (`data.lm.file_tokens`: [BOS] text EOS per record;
  a JSONL record's prompt is context only). The counted tokens are those training puts a loss on.
- Windows: non-overlapping blocks of `block_size` tokens (default data.seq_len; the last block may be shorter),
  or with `stride` < block_size Hugging Face's sliding windows. A counted token is predicted from the tokens before
  it in its window; the first token of the stream (and of each block) has no context and is not counted.
- A chat file (conversations): each conversation is its own window, its assistant tokens the counted ones.
- perplexity = exp(summed NLL / counted tokens), NLL from float32 logits, summed in float64.
It keeps no full-file logits, so memory depends on the window, not the file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fulltune.config import DataConfig
from fulltune.data.chat import file_batches as chat_file_batches
from fulltune.data.chat import is_chat_jsonl
from fulltune.data.lm import IGNORE, file_tokens
from fulltune.errors import ConfigError, DataError
from fulltune.runtime.device import to_device


@dataclass(frozen=True)
class Window:
    """One model input: tokens ``[start, end)`` of the stream; positions ``>= score_from`` inside it are scored.

    Position ``j`` of the window is predicted by the logits at ``j - 1``, so ``score_from`` is always >= 1.
    """

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def n_scored(self) -> int:
        return self.length - self.score_from


def iter_windows(n_tokens: int, block_size: int, stride: int | None = None) -> Iterator[Window]:
    """Yield the windows that cover a stream of ``n_tokens`` tokens.

    ``stride`` None or == ``block_size``: non-overlapping blocks (the last may be shorter); the first token of each
    block has no context and is not scored. ``stride < block_size``: Hugging Face's sliding-window scheme, windows
    start every ``stride`` tokens and only the tokens not scored by the previous window are scored, so every token
    but the very first is predicted exactly once with up to ``block_size - 1`` tokens of context.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if stride == block_size:
        for start in range(0, n_tokens, block_size):
            end = min(start + block_size, n_tokens)
            if end - start >= 2:  # a 1-token tail block predicts nothing
                yield Window(start, end, 1)
        return
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + block_size, n_tokens)
        # tokens [start, prev_end) were scored by an earlier window: they are context only here
        score_from = max(prev_end - start, 1)
        if end - start >= 2 and end > prev_end:
            yield Window(start, end, score_from)
        prev_end = end
        if end == n_tokens:
            break


def iter_window_batches(windows: Iterator[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group consecutive windows of equal length into batches of at most ``batch_size`` (no padding needed)."""
    batch: list[Window] = []
    for win in windows:
        if batch and (len(batch) == batch_size or win.length != batch[0].length):
            yield batch
            batch = []
        batch.append(win)
    if batch:
        yield batch


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed NLL in float64, counted tokens) of one batch of windows: position j-1 predicts token j, for every
    j whose label is not IGNORE. input_ids and labels are (B, T)."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
    return nll.double(), int((targets != IGNORE).sum())


def _autocast(
    autocast_ctx: contextlib.AbstractContextManager | Callable[[], contextlib.AbstractContextManager] | None,
) -> contextlib.AbstractContextManager:
    if autocast_ctx is None:
        return contextlib.nullcontext()
    if callable(autocast_ctx) and not hasattr(autocast_ctx, "__enter__"):
        return autocast_ctx()
    return autocast_ctx


def _result(nll_sum: float, n_tokens: int, block_size: int, stride: int) -> dict[str, Any]:
    if n_tokens == 0:
        raise ValueError("token stream too short: no token could be predicted")
    mean_nll = nll_sum / n_tokens
    return {
        "perplexity": math.exp(min(mean_nll, 700.0)),
        "loss": mean_nll,
        "nll": mean_nll,
        "tokens": n_tokens,
        "method": "blocks" if stride == block_size else "sliding_window",
        "block_size": block_size,
        "stride": stride,
    }


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    autocast_ctx: contextlib.AbstractContextManager | Callable[[], contextlib.AbstractContextManager] | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the 1-D token stream ``token_ids`` (e.g. a whole test file); ``labels`` (1-D, IGNORE
    where a token is not counted; default: every token counts) as `data.lm.tokenize_records` gives them.

    ``autocast_ctx`` is a context manager (or a zero-argument factory of one, e.g.
    ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``) entered once around the whole evaluation.

    Returns ``{"perplexity", "loss" and "nll" (mean NLL per counted token, nats), "tokens" (counted tokens),
    "method" ("blocks" | "sliding_window"), "block_size", "stride"}``.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stride_eff = block_size if stride is None else stride
    device = torch.device(device) if device is not None else _model_device(model)
    token_ids = token_ids.long()
    labels = token_ids if labels is None else labels.long()

    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    try:
        with _autocast(autocast_ctx):
            windows = iter_windows(token_ids.numel(), block_size, stride_eff)
            for batch in iter_window_batches(windows, batch_size):
                input_ids = torch.stack([token_ids[w.start : w.end] for w in batch]).to(device)  # (B, T)
                targets = torch.stack([labels[w.start : w.end] for w in batch]).to(device)  # (B, T)
                # tokens before score_from were counted by an earlier window: context only here
                cols = torch.arange(targets.shape[1], device=device)
                first = torch.tensor([w.score_from for w in batch], device=device)
                targets = targets.masked_fill(cols[None, :] < first[:, None], IGNORE)
                nll, count = window_nll(model, input_ids, targets)
                nll_sum += nll
                n_tokens += count
    finally:
        model.train(was_training)
    return _result(nll_sum.item(), n_tokens, block_size, stride_eff)


@torch.inference_mode()
def block_perplexity(
    model: torch.nn.Module, loader: Any, device: torch.device, autocast_ctx: Any = None
) -> dict[str, Any]:
    """`perplexity` over packed blocks (a loader of {"input_ids", "labels"} (B, seq_len) batches, as `data.lm.pack`
    cuts them with keep_tail): the blocks are its non-overlapping windows, so on one file the training run's
    validation gives what `perplexity` gives with block_size = seq_len."""
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens, block_size = 0, 0
    try:
        with _autocast(autocast_ctx):
            for batch in loader:
                batch = to_device(batch, device)
                block_size = batch["input_ids"].shape[1]
                nll, count = window_nll(model, batch["input_ids"], batch["labels"])
                nll_sum += nll
                n_tokens += count
    finally:
        model.train(was_training)
    out = _result(nll_sum.item(), n_tokens, block_size, block_size)
    return {k: out[k] for k in ("loss", "perplexity", "tokens")}


def check_windows(block_size: int | None, stride: int | None) -> None:
    """--block_size and --stride as `perplexity` takes them, else one error naming the flag (block_size None: not
    known yet, the stride is checked against it later)."""
    if block_size is not None and block_size < 2:
        raise ConfigError(
            f"--block_size {block_size}: expected >= 2 (a window predicts each token from the one before)"
        )
    if stride is not None and stride < 1:
        raise ConfigError(f"--stride {stride}: expected >= 1")
    if stride is not None and block_size is not None and stride > block_size:
        raise ConfigError(f"--stride {stride}: expected at most the block size ({block_size}, --block_size)")


def file_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    data: DataConfig,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    autocast_ctx: Any = None,
) -> dict[str, Any]:
    """`perplexity` of a text or JSONL file (read with data.encoding and the run's fields), framed as training
    frames it; a file with fewer than 2 tokens to predict is one error naming it. A chat file (conversations) is
    scored as training's validation scores it: each conversation its own window, cut at `block_size`, its
    assistant tokens counted (`block_perplexity`)."""
    check_windows(block_size, stride)
    if is_chat_jsonl(Path(path), data):
        if stride is not None:
            raise ConfigError(f"--stride {stride}: a chat file is scored one whole conversation per window")
        batches = chat_file_batches(Path(path), data, tokenizer, block_size, batch_size)
        out = block_perplexity(model, batches, torch.device(device) if device else _model_device(model), autocast_ctx)
        return out | {"method": "conversations", "block_size": block_size, "file": str(path)}
    ids, labels = file_tokens(Path(path), data, tokenizer)
    counted = int((labels[1:] != IGNORE).sum())
    if counted < 2:  # a one-token text would be scored on its end token alone
        raise DataError(f"'{path}': {counted} token(s) to predict, too few to measure a perplexity (at least 2)")
    out = perplexity(model, ids, block_size, stride, batch_size, device, autocast_ctx, labels=labels)
    return out | {"file": str(path)}
