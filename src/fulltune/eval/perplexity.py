"""Perplexity of a causal LM over a whole tokenised text file.

Owns file tokenisation (bounded memory), the block / sliding-window iteration over the token stream and the
float64 NLL accumulation; it keeps no full-file logits, so memory depends on the window, not the file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


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


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    autocast_ctx: contextlib.AbstractContextManager | Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the 1-D token stream ``token_ids`` (e.g. a whole test file).

    The per-token NLL is computed here with ``F.cross_entropy`` on float32 logits (not the model's mean loss) and
    summed in float64 over the file. ``autocast_ctx`` is a context manager (or a zero-argument factory of one,
    e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``) entered once around the whole evaluation.

    Returns ``{"perplexity", "nll" (mean NLL per predicted token, nats), "tokens" (predicted tokens),
    "method" ("blocks" | "sliding_window"), "block_size", "stride"}``.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stride_eff = block_size if stride is None else stride
    method = "blocks" if stride_eff == block_size else "sliding_window"
    device = torch.device(device) if device is not None else _model_device(model)
    token_ids = token_ids.long()

    if autocast_ctx is None:
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    elif callable(autocast_ctx) and not hasattr(autocast_ctx, "__enter__"):
        ctx = autocast_ctx()
    else:
        ctx = autocast_ctx

    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    try:
        with ctx:
            windows = iter_windows(token_ids.numel(), block_size, stride_eff)
            for batch in iter_window_batches(windows, batch_size):
                input_ids = torch.stack([token_ids[w.start : w.end] for w in batch]).to(device)  # (B, T)
                logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
                # position j-1 predicts token j: (B, T-1, V) against (B, T-1)
                nll = F.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
                )  # (B, T-1)
                # target j (window position) sits at column j-1: score columns >= score_from - 1
                cols = torch.arange(nll.shape[1], device=device)
                first = torch.tensor([w.score_from - 1 for w in batch], device=device)
                keep = cols[None, :] >= first[:, None]
                nll_sum += nll.masked_select(keep).double().sum()
                n_tokens += sum(w.n_scored for w in batch)
                del logits, nll
    finally:
        model.train(was_training)

    if n_tokens == 0:
        raise ValueError("token stream too short: no token could be predicted")
    mean_nll = nll_sum.item() / n_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n_tokens,
        "method": method,
        "block_size": block_size,
        "stride": stride_eff,
    }
