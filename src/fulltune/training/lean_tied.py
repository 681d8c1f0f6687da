"""Lean mode's fused step for a weight that the input embedding and the output head share (tied embeddings, as
Llama-3.2-1B's): its [vocab, hidden] gradient is never held whole. The head's weight gradient is made in vocabulary
chunks as backward reaches the head and each chunk's rows are stepped at once; only the rows of the token ids that
the batch's lookup used keep their head gradient until the lookup's backward adds its own part and steps them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TiedEmbeddingStep", "tied_embeddings", "tied_step_blocker"]

# rows of the head's weight gradient made at once: about this many elements (2 MiB of bf16 gradient)
CHUNK_ELEMENTS = 1 << 20


def tied_embeddings(model: nn.Module) -> tuple[Any, Any] | None:
    """(input embedding, output head) when the model ties them (one weight tensor), else None."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return None
    try:
        emb, head = get_in(), get_out()
    except NotImplementedError:  # transformers raises this for models without a token embedding (CLIP's image tower)
        return None
    if emb is None or head is None or getattr(emb, "weight", None) is None:
        return None
    return (emb, head) if getattr(head, "weight", None) is emb.weight else None


def tied_step_blocker(emb: Any, head: Any, unit: int, per_param_max_norm: float | None) -> str:
    """Why the tied weight cannot be stepped in vocabulary chunks ('' when it can): the plain per-tensor step then
    holds its whole gradient. `unit`: the optimizer's `range_unit` for the weight (0: it steps whole tensors only;
    `lowbit.moment_block` says it from the config); the trainer and `plan` both ask here."""
    w = emb.weight
    if type(emb) is not nn.Embedding or type(head) is not nn.Linear:
        return f"the lookup or head is a {type(emb).__name__} / {type(head).__name__}, not a plain Embedding / Linear"
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return "the embedding renormalizes, scales its gradient by frequency, or has a sparse gradient"
    if not unit:
        return "the optimizer steps whole tensors only"
    if per_param_max_norm is not None:
        return "max_grad_norm clips each tensor by the norm of its whole gradient"
    if w.shape[1] % unit or not w.is_contiguous():
        return f"a row of {w.shape[1]} elements is not a whole number of {unit}-element blocks of its moments"
    return ""


class _Lookup(torch.autograd.Function):
    """The embedding lookup; its backward hands the rows' gradient to the tied step instead of to `weight`."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, tied: TiedEmbeddingStep) -> Tensor:
        ctx.tied = tied
        return nn.functional.embedding(ids, weight, tied.embedding.padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, None]:
        ctx.tied.lookup_backward(grad_out)
        return None, None, None  # no gradient for the weight: nothing accumulates a [vocab, hidden] one


class _Head(torch.autograd.Function):
    """The output head `h @ weight.T (+ bias)`; its backward steps `weight` in vocabulary chunks instead of returning
    a [vocab, hidden] gradient (the gradients of `h` and `bias` go back as autograd computes them)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, tied: TiedEmbeddingStep) -> Tensor:
        ctx.save_for_backward(h)
        ctx.tied, ctx.lookup, ctx.has_bias = tied, tied.lookup, bias is not None
        tied.lookup = None  # the lookup that this forward's input came from, if any
        return nn.functional.linear(h, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor) -> tuple[Tensor, None, Tensor | None, None]:
        (h,) = ctx.saved_tensors
        w = ctx.tied.weight
        flat_g, flat_h = grad_logits.reshape(-1, w.shape[0]), h.reshape(-1, w.shape[1])
        grad_h = flat_g.mm(w).view(h.shape)  # before any row of w changes; as autograd's mm backward computes it
        grad_bias = flat_g.sum(0) if ctx.has_bias else None
        ctx.tied.head_backward(flat_g, flat_h, ctx.lookup)
        return grad_h, None, grad_bias, None


class TiedEmbeddingStep:
    """Steps a tied embedding/head weight during backward without its whole gradient (see the module docstring).

    `handle`: the fused step's handle (`lean_fused.FusedStepHandle`), whose optimizer, group index and
    non-finite flag it uses. Each row gets one AdamW update per backward with its full gradient (head part +
    lookup part), as the plain per-tensor step gives it: `optimizer.begin_update` once, then `update_range` over
    row ranges. Row gradients are computed as autograd computes them (the head's as rows of
    `grad_logits.T @ h`, the lookup's with `embedding_dense_backward` over the batch's distinct ids), so the
    result equals the plain step's wherever the matrix product's rows do not depend on the chunking.
    """

    def __init__(self, emb: nn.Embedding, head: nn.Linear, handle: Any) -> None:
        self.embedding, self.head, self.weight = emb, head, emb.weight
        # the last lookup's distinct ids (sorted) and each position's index among them, until the head's forward
        self.lookup: tuple[Tensor, Tensor] | None = None
        self._pending: tuple[Tensor, Tensor, list[int]] | None = None  # (inverse, held, ids) between the two backwards
        self._handle = handle
        hidden = self.weight.shape[1]
        self.rows_per_chunk = max(1, CHUNK_ELEMENTS // hidden)
        emb.forward = self._lookup_forward
        head.forward = self._head_forward

    def remove(self) -> None:
        """Give the modules their own forward back."""
        del self.embedding.forward, self.head.forward

    def _lookup_forward(self, ids: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return nn.Embedding.forward(self.embedding, ids)
        self.lookup = torch.unique(ids, sorted=True, return_inverse=True)
        return _Lookup.apply(ids, self.weight, self)

    def _head_forward(self, h: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return nn.Linear.forward(self.head, h)
        return _Head.apply(h, self.weight, self.head.bias, self)

    def _group(self) -> dict[str, Any]:
        opt = self._handle._optimizer
        return opt.param_groups[self._handle._group_index[id(self.weight)]]

    def _update(self, grad_rows: Tensor, first_row: int) -> None:
        w = self.weight
        self._handle._optimizer.update_range(w, self._group(), grad_rows, first_row * w.shape[1])

    @torch.no_grad()
    def head_backward(self, grad_logits: Tensor, h: Tensor, lookup: tuple[Tensor, Tensor] | None) -> None:
        """Rows [a, b) of the weight's gradient at a time (`grad_logits`: [tokens, vocab], `h`: [tokens, hidden]):
        rows of the lookup's ids are kept for the lookup's backward, the others stepped."""
        w = self.weight
        self._handle.arm()
        self._handle._optimizer.begin_update(w, self._group())
        ids_list = [] if lookup is None else lookup[0].tolist()
        held = torch.empty(len(ids_list), w.shape[1], dtype=w.dtype, device=w.device)
        j = 0
        for a in range(0, w.shape[0], self.rows_per_chunk):
            b = min(w.shape[0], a + self.rows_per_chunk)
            grad = grad_logits[:, a:b].t().mm(h)  # rows a..b of grad_logits.T @ h: [b - a, hidden]
            self._handle.check_finite(w, grad)
            start = a
            while j < len(ids_list) and ids_list[j] < b:
                row = ids_list[j]
                held[j] = grad[row - a]
                if row > start:
                    self._update(grad[start - a : row - a], start)
                start, j = row + 1, j + 1
            if start < b:
                self._update(grad[start - a :], start)
        if lookup is None:
            self._handle.param_updates += 1
        else:
            self._pending = (lookup[1], held, ids_list)

    @torch.no_grad()
    def lookup_backward(self, grad_out: Tensor) -> None:
        """The lookup's gradient of the batch's distinct rows (`grad_out`: [..., hidden]) added to their head
        part, and those rows stepped, consecutive ids together."""
        if self._pending is None:
            raise RuntimeError("the tied embedding's lookup reached backward before its head")
        inverse, held, ids = self._pending
        self._handle.arm()
        pad = self.embedding.padding_idx
        pad_row = ids.index(pad) if pad in ids else -1  # its lookup gradient stays 0, as Embedding's
        rows = torch.ops.aten.embedding_dense_backward(grad_out, inverse, len(ids), pad_row, False)
        self._handle.check_finite(self.weight, rows)
        self._step_held(held.add_(rows), ids)

    def _step_held(self, grad: Tensor, ids: list[int]) -> None:
        k = 0
        while k < len(ids):
            end = k + 1
            while end < len(ids) and ids[end] == ids[end - 1] + 1:
                end += 1
            self._update(grad[k:end], ids[k])
            k = end
        self._pending = None
        self._handle.param_updates += 1

    def end_backward(self) -> None:
        """At the end of a backward: rows whose lookup part never came (the lookup's output did not reach the
        loss) take their head gradient alone, which is then all of it."""
        if self._pending is not None:
            self._step_held(self._pending[1], self._pending[2])
