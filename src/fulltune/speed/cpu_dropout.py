"""Dropout for training on a CPU: the same layer, its mask drawn from 16-bit random numbers, four per 64-bit draw.

torch's CPU dropout draws one Mersenne-twister number per element (`bernoulli_`): on a BERT-sized model with short
sequences that is a noticeable share of a training step. Here one full-range 64-bit draw from the same generator
gives four 16-bit numbers, and an element is dropped when its number falls under round(p * 65536): the drop
probability is p to within 2**-17 (0.1 -> 0.1000061), the kept elements are scaled by 1 / (1 - that probability),
so the layer stays unbiased. The draws come from torch's default CPU generator, so seeding and exact resume work as
before; the masks are not the ones torch would draw. What it buys, measured: docs/performance.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

_LEVELS = 2**16


class _MaskedScale(torch.autograd.Function):
    """x * mask, where mask holds 0 or the keep scale in x's dtype (as torch's CPU dropout keeps it): backward is
    one multiplication."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class CPUDropout(nn.Dropout):
    """`nn.Dropout` whose training-mode mask is drawn four elements per 64-bit random number on CPU tensors; other
    devices (and `inplace=True`) take torch's own dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace or not x.is_floating_point():
            return super().forward(x)
        return _drop(x, self.p)


def dropout_layers(model: nn.Module) -> int:
    """How many plain `nn.Dropout` layers with p > 0 `model` holds (what `swap_dropout` replaces)."""
    return sum(type(m) is nn.Dropout and m.p > 0 for m in model.modules())


def swap_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` with p > 0 in `model` by a `CPUDropout` of the same p; returns how many. They
    hold no parameters or buffers, so state dicts, saving and loading are unchanged."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                replacement = CPUDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    return swapped


def _transformers_model(model: nn.Module) -> PreTrainedModel | None:
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def on_sdpa(model: nn.Module) -> bool:
    """Whether `model` is (or wraps) a transformers model on SDPA attention, which `use_cpu_attention` switches."""
    base = _transformers_model(model)
    return base is not None and getattr(base.config, "_attn_implementation", None) == "sdpa"


def _requested(base: PreTrainedModel) -> dict[str, Any]:
    """`attention` for the model and each sub-config that a module of the model runs; a sub-config with no module
    (CLIP's text_config under an image classifier) keeps its own, so transformers need not set it blind and warn
    of undefined behavior."""
    used = {id(getattr(m, "config", None)) for m in base.modules()}
    request: dict[str, Any] = {"": ATTENTION}
    for key in base.config.sub_configs:
        sub = getattr(base.config, key, None)
        if sub is not None:
            request[key] = ATTENTION if id(sub) in used else sub._attn_implementation
    return request


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a transformers model on SDPA attention to `attention` (SDPA itself whenever no attention dropout
    applies); True if it did. The attention implementation is not part of a saved config.json."""
    if not on_sdpa(model):
        return False
    base = _transformers_model(model)
    register_attention()
    try:
        base.set_attn_implementation(_requested(base))  # type: ignore[arg-type]
    except (ValueError, ImportError):  # a model that takes no custom attention keeps SDPA
        return False
    return base.config._attn_implementation == ATTENTION  # type: ignore[union-attr]


def use_cpu_dropout(model: nn.Module) -> int:
    """Both of `speed.cpu_dropout`: `swap_dropout` and `use_cpu_attention`; returns how many dropout layers were
    replaced."""
    swapped = swap_dropout(model)
    use_cpu_attention(model)
    return swapped


ATTENTION = "fulltune_cpu"
"""The name under which `attention` is registered with transformers' attention (and mask) interfaces."""


def _drop(x: Tensor, p: float, owned: bool = False) -> Tensor:
    """Dropout of `x` in training mode with the 16-bit masks above; `owned`: x is the caller's own temporary, which
    is then masked in place where no gradient needs it."""
    dropped = round(p * _LEVELS)
    if dropped >= _LEVELS:
        return x * 0
    n = x.numel()
    # randint's upper bound is exclusive: 2**64 - 1 values, so one of the 2**64 bit patterns never comes up.
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    numbers = draws.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    mask = (numbers >= dropped - _LEVELS // 2).to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
    del draws, numbers
    if owned and not (torch.is_grad_enabled() and x.requires_grad):
        return x.mul_(mask)
    return _MaskedScale.apply(x, mask)


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """transformers' attention function for training on a CPU with attention dropout.

    There torch's SDPA falls back to its math kernel, which (for bf16 inputs) upcasts q, k and v to fp32, multiplies
    in fp32 and draws the dropout mask with `bernoulli_`. This is the same attention as transformers' eager path
    under autocast (bf16 products, fp32 softmax) with the 16-bit masks above: less time per layer, more so the longer
    the texts, and fewer bytes kept for backward (docs/performance.md). Anything else (no dropout, evaluation,
    another device, an attention bias, a soft cap, a sliding window, attention weights asked for) goes to
    transformers' SDPA; the masks it receives are SDPA's (a boolean mask is registered for this name), so both paths
    read the same ones.
    """
    plain = dropout > 0 and query.device.type == "cpu"
    plain = plain and all(kwargs.get(k) is None for k in ("position_bias", "softcap", "sliding_window"))
    if not plain or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    # In place where autograd allows it (a product's backward needs its inputs, not its output): fewer S x S buffers.
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    del scores
    probs = _drop(probs.to(query.dtype), dropout, owned=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `attention` (and SDPA's mask format under its name) known to transformers; idempotent."""
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
