"""A sequence classifier whose head reads only the first token: its last encoder layer computes that token only.

BERT-family classifiers (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT) classify from the first position of the last
layer's output ([CLS] or <s>). Tokens mix only inside attention, so the last layer's other positions feed nothing
but the unused rest of `last_hidden_state`: that layer needs keys and values for every token and everything else
(the query, the attention output, the feed-forward block, their dropout and layer norms, forward and backward) for
the first token alone. Per layer that is 2 of its 12 hidden-size-squared matrix products per token; on MiniLM-L6
(6 layers) it takes about an eighth of the encoder's work out of a training step (measured: docs/performance.md).
The logits, the loss and every gradient are those of the full computation (up to rounding; with dropout on, the
masks drawn differ).

Only the layer's class changes (a subclass of its own, `first_token_layer`), so parameters, names and the state
dict stay; `all_tokens` restores it. The model's `last_hidden_state` then holds one position: the swap is for
training and evaluating the classifier, never for models whose hidden states are read (token classification,
embeddings, hidden states asked for: those calls take the full layer).

Its query reads another input than its key and value, so where `qkv.fuse_qkv` made them one group the layer
computes each projection on its own (`QKVLinear.alone`): the two patches can be applied in either order.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from fulltune.speed.qkv import QKVLinear

MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
"""`config.model_type`s whose `...ForSequenceClassification` head reads the first position only (BERT's pooler,
RoBERTa's and ELECTRA's classification heads: `features[:, 0]`)."""
_SWAPPED: dict[type, type] = {}


class _FirstTokenLayer(nn.Module):
    """Mixed into a BERT-style layer's class: its forward returns the first position only, shape (batch, 1, hidden)."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        full = super().forward  # type: ignore[misc]
        if encoder_hidden_states is not None or args or kwargs.get("cache") is not None:
            return full(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return full(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("cache", None)
        attention = self.attention  # type: ignore[attr-defined]
        sa = attention.self
        batch, length, _ = hidden_states.shape
        first = hidden_states[:, :1]
        heads = (-1, sa.attention_head_size)
        query = _project(sa.query, first).view(batch, 1, *heads).transpose(1, 2)
        key = _project(sa.key, hidden_states).view(batch, length, *heads).transpose(1, 2)
        value = _project(sa.value, hidden_states).view(batch, length, *heads).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] == length:
            attention_mask = attention_mask[:, :, :1]  # the first query's row of the mask
        function = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
        context, _ = function(
            sa,
            query,
            key,
            value,
            attention_mask,
            dropout=sa.dropout.p if sa.training else 0.0,
            scaling=sa.scaling,
            **kwargs,
        )
        attended = attention.output(context.reshape(batch, 1, -1), first)
        return self.feed_forward_chunk(attended)  # type: ignore[attr-defined]


def _project(projection: nn.Module, x: Tensor) -> Tensor:
    """One projection of `x`: a fused q/k/v projection on its own (the query here reads another input)."""
    return projection.alone(x) if isinstance(projection, QKVLinear) else projection(x)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def applies_to(model: nn.Module) -> bool:
    """Whether `model` (a peft wrapper is looked through) is a first-token sequence classifier (`MODEL_TYPES`) whose
    last layer `first_token_layer` can swap."""
    return _layers(_base(model)) is not None


def _layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's layer list of a first-token sequence classifier, or None if `model` is not one."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return None
    if not type(model).__name__.endswith("ForSequenceClassification") or getattr(config, "is_decoder", False):
        return None
    encoder = getattr(getattr(model, config.model_type.replace("-", "_"), None), "encoder", None)
    if encoder is None:
        encoder = getattr(getattr(model, "roberta", None), "encoder", None)  # XLM-R and CamemBERT keep `roberta`
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    sa = getattr(getattr(last, "attention", None), "self", None)
    needed = ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config")
    if sa is None or not all(hasattr(sa, n) for n in needed) or not hasattr(last, "feed_forward_chunk"):
        return None
    if getattr(last, "add_cross_attention", False) or getattr(last, "chunk_size_feed_forward", 0):
        return None
    return layers


def first_token_layer(model: nn.Module) -> bool:
    """Make the last encoder layer of a first-token sequence classifier (`MODEL_TYPES`) compute the first token
    only; True if it did (or had). A peft wrapper is looked through."""
    layers = _layers(_base(model))
    if layers is None:
        return False
    last = layers[-1]
    if isinstance(last, _FirstTokenLayer):
        return True
    cls = type(last)
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"FirstToken{cls.__name__}", (_FirstTokenLayer, cls), {})
    last.__class__ = _SWAPPED[cls]
    return True


def all_tokens(model: nn.Module) -> None:
    """Undo `first_token_layer`: the last layer computes every position again."""
    for module in model.modules():
        if isinstance(module, _FirstTokenLayer):
            mro = type(module).__mro__
            module.__class__ = mro[mro.index(_FirstTokenLayer) + 1]
