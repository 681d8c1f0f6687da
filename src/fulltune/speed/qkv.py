"""An attention's q, k and v projections as one matrix product, where all three read the same input.

Transformers call `query(x)`, `key(x)` and `value(x)` one after the other: three matrix products, under autocast
three casts of `x` to bf16, and in backward three products for the input's gradient that autograd then adds up.
On a CPU with short texts these fixed costs are a good part of a step; one product, one cast and one input
gradient take them out (measured: docs/performance.md). The projections keep their own parameters, names and
state dict; only their class changes, to one whose first call computes all three outputs from the concatenated
weights and whose two other calls, with the same input tensor, take theirs. When the inputs differ
(cross-attention: q from the text, k and v from the encoder) the first mismatch turns the group back into three
plain projections for good. A caller that knows its inputs differ computes a projection on its own with
`QKVLinear.alone`, which leaves the group as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRIPLES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
"""Child names of the q, k and v projections in the transformers models fulltune trains (BERT, RoBERTa, ViT, CLIP,
Llama, DistilBERT...)."""


class _Group:
    """The three projections of one attention, and the outputs of the last fused call not yet taken."""

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.input: Tensor | None = None
        self.outputs: list[Tensor | None] = [None, None, None]
        self.fused = True

    def take(self, index: int, x: Tensor) -> Tensor | None:
        """This projection's output of `x` from the last fused call, if there is one."""
        if self.input is not x or self.outputs[index] is None:
            return None
        out, self.outputs[index] = self.outputs[index], None
        if all(o is None for o in self.outputs):
            self.input = None
        return out

    def compute(self, index: int, x: Tensor) -> Tensor:
        if any(o is not None for o in self.outputs):  # a fused call's outputs were never asked for: inputs differ
            self.fused, self.input, self.outputs = False, None, [None, None, None]
        mods = self.modules
        if not self.fused:
            return F.linear(x, mods[index].weight, mods[index].bias)
        weight = torch.cat([m.weight for m in mods])
        bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        outputs: list[Tensor | None] = list(F.linear(x, weight, bias).split(self.sizes, dim=-1))
        out, outputs[index] = outputs[index], None
        self.input, self.outputs = x, outputs
        return out  # type: ignore[return-value]


class QKVLinear(nn.Linear):
    """`nn.Linear` that is one of an attention's q / k / v projections (set by `fuse_qkv`)."""

    qkv_group: _Group
    qkv_index: int

    def forward(self, x: Tensor) -> Tensor:
        group = self.qkv_group
        out = group.take(self.qkv_index, x)
        return group.compute(self.qkv_index, x) if out is None else out

    def alone(self, x: Tensor) -> Tensor:
        """This projection of `x` as a plain `nn.Linear` computes it, outside its group (which is left as it is)."""
        return F.linear(x, self.weight, self.bias)


def _fusable(mods: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear for m in mods):  # (LoRA-wrapped or quantised projections are left alone)
        return False
    first = mods[0]
    return all(
        m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        for m in mods
    )


def _triples(model: nn.Module) -> list[list[nn.Linear]]:
    """Every q / k / v triple of plain `nn.Linear` children (names in `TRIPLES`) that `fuse_qkv` can fuse."""
    found, seen = [], set()
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in TRIPLES:
            mods = [children.get(n) for n in names]
            if any(m is None or id(m) in seen for m in mods) or not _fusable(mods):  # type: ignore[arg-type]
                continue
            seen.update(id(m) for m in mods)
            found.append(mods)
    return found  # type: ignore[return-value]


def fusable(model: nn.Module) -> int:
    """How many attentions of `model` `fuse_qkv` would change."""
    return len(_triples(model))


def fuse_qkv(model: nn.Module) -> int:
    """Make every q / k / v triple of plain `nn.Linear` children (names in `TRIPLES`) compute as one product;
    returns how many attentions were changed. Parameters, their names and the state dict stay as they were."""
    triples = _triples(model)
    for mods in triples:
        group = _Group(mods)
        for index, m in enumerate(mods):
            m.__class__ = QKVLinear
            m.qkv_group, m.qkv_index = group, index  # type: ignore[attr-defined]
    return len(triples)
