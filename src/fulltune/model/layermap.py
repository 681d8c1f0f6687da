"""The per-family layer map: parameter name -> layer index (0 embeddings, 1..L blocks, L+1 what sits above them and
the head), from name patterns of each model family. Layer-wise LR decay, partial fine-tuning and progressive
unfreezing are computed from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class _Family:
    name: str
    embeddings: str
    """Regex (searched) of the parameters below the first block."""
    block: str
    """Regex (searched) of block parameters; the first group that matched is the block's index."""
    head: str
    """Regex (matched at the start) of the task head."""


# The first family whose block regex matches some parameter wins. Spellings are transformers 5's; `layers?` and an
# optional `encoder.` also accept the older ones (transformers 4 ViT: vit.encoder.layer.N, v5: vit.layers.N).
_FAMILIES: list[_Family] = [
    _Family(
        "clip_vision",
        r"vision_model\.(embeddings|pre_layrnorm)\.",
        r"vision_model\.encoder\.layers\.(\d+)\.",
        r"classifier\.",
    ),
    _Family(
        "vit",
        r"(vit|deit|dinov2|beit)\.embeddings\.",
        r"(?:vit|deit|dinov2|beit)\.(?:encoder\.)?layers?\.(\d+)\.",
        r"classifier\.",
    ),
    _Family(
        "bert",
        r"(bert|roberta|electra|deberta|distilbert)\.embeddings\.",
        r"(?:bert|roberta|electra|deberta)\.encoder\.layers?\.(\d+)\.|distilbert\.transformer\.layers?\.(\d+)\.",
        r"(classifier|pre_classifier)\.",
    ),
    _Family(
        "decoder",
        r"(model\.embed_tokens|transformer\.wte|transformer\.wpe)\.",
        r"(?:model\.layers|transformer\.h)\.(\d+)\.",
        r"(lm_head|score)\.",
    ),
]
# Anything else: blocks are the numbered children of a layers/layer/h/blocks container.
_GENERIC = _Family(
    "generic", r"embed", r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.", r"(classifier|score|lm_head|head|fc)\."
)
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_HEAD = -1  # layer key of head parameters while grouping names into prefixes


@dataclass
class LayerMap:
    """Where each parameter sits in the network, and the names an unfreeze schedule may use."""

    family: str
    num_layers: int
    layer_of: dict[str, int]
    """Parameter name (as `named_parameters` gives it, peft prefix included) -> 0..L+1; the head maps to L+1."""
    head: set[str]
    """Names of the head's parameters (a LoRA model's head copies included)."""
    block_prefixes: list[str]
    """Module prefix of each block, bottom to top (e.g. 'bert.encoder.layer.0')."""
    embedding_prefixes: list[str] = field(default_factory=list)
    """Module prefixes below the first block (e.g. 'bert.embeddings')."""
    top_prefixes: list[str] = field(default_factory=list)
    """Module prefixes above the last block, head excluded (e.g. 'bert.pooler', 'model.norm')."""

    def scale(self, name: str, decay: float, head_mult: float) -> float:
        """LR multiplier: block i (1-indexed) of L gets decay ** (L - i); embeddings decay ** L; what sits above
        the blocks decay ** 0; the head head_mult."""
        if name in self.head:
            return head_mult
        layer = min(self.layer_of[name], self.num_layers)
        return decay ** (self.num_layers - layer)

    def names(self) -> list[str]:
        """Module prefixes bottom to top: what `layer_of` groups, in the words a config may use."""
        return self.embedding_prefixes + self.block_prefixes + self.top_prefixes


def strip_peft_prefix(name: str) -> str:
    return _PEFT_PREFIX.sub("", name)


def _block_index(match: re.Match) -> int:
    return int(next(g for g in match.groups() if g is not None))


def is_under(name: str, prefix: str) -> bool:
    """True when `name` is `prefix` itself or a parameter/module below it ('a.b' is under 'a', 'ab' is not)."""
    return name == prefix or name.startswith(prefix + ".")


def _module_prefixes(keys: dict[str, int], wanted: int) -> list[str]:
    """The shortest module prefixes that cover exactly the parameters with layer key `wanted`, in name order.

    'bert.pooler.dense.weight' gives 'bert.pooler' (the whole of 'bert' would also hold blocks), so each prefix
    names one part of the network that a user may unfreeze by itself.
    """
    found: list[str] = []
    for name, key in keys.items():
        if key != wanted or any(is_under(name, p) for p in found):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if all(v == wanted for n, v in keys.items() if is_under(n, prefix)):
                found.append(prefix)
                break
    return found


def layer_map(model: nn.Module) -> LayerMap:
    """Map every parameter of `model` (plain or peft-wrapped) to its layer index by the family's name patterns."""
    raw = [n for n, _ in model.named_parameters()]
    names = [strip_peft_prefix(n) for n in raw]
    family = next((f for f in _FAMILIES if any(re.search(f.block, n) for n in names)), _GENERIC)
    # Block indices as written in the names need not start at 0 or be contiguous (pruned models): rank them.
    block_ids = sorted({_block_index(m) for n in names if (m := re.search(family.block, n))})
    num_layers = len(block_ids)
    position = {b: i + 1 for i, b in enumerate(block_ids)}
    keys: dict[str, int] = {}  # stripped name -> layer index, or _HEAD
    block_prefixes: dict[int, str] = {}
    for name in names:
        if re.match(family.head, name):
            keys[name] = _HEAD
        elif m := re.search(family.block, name):
            keys[name] = position[_block_index(m)]
            block_prefixes.setdefault(keys[name], name[: m.end()].rstrip("."))
        elif re.search(family.embeddings, name):
            keys[name] = 0
        else:
            keys[name] = num_layers + 1
    return LayerMap(
        family=family.name,
        num_layers=num_layers,
        layer_of={r: (num_layers + 1 if keys[n] == _HEAD else keys[n]) for r, n in zip(raw, names, strict=True)},
        head={r for r, n in zip(raw, names, strict=True) if keys[n] == _HEAD},
        block_prefixes=[block_prefixes[i] for i in sorted(block_prefixes)],
        embedding_prefixes=_module_prefixes(keys, 0),
        top_prefixes=_module_prefixes(keys, num_layers + 1),
    )
