"""Structured (width) pruning of Llama-family decoders (Llama, Qwen2, Mistral) and save/load of the uneven result.

Owns importance scoring (first-order Taylor or magnitude), per-layer ratio allocation, GQA-aware removal of whole
key/value groups and of MLP channels, and the per-layer shape record in config.json that `load_pruned` rebuilds from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fulltune.speed.filepages import release_file_pages

SHAPES_KEY = "fulltune_layer_shapes"
REPORT_FILE = "fulltune_prune_report.json"


@dataclass
class PruneConfig:
    """Options of `prune_model`.

    pruning_ratio: fraction of KV groups (attention) and of intermediate channels (MLP) removed per pruned layer,
        on average over [layer_start, layer_end) when ``layer_ratios="importance"``.
    importance: "taylor" (|w * dL/dw| from calibration blocks, needs ``calibration_ids``) or "magnitude" (|w|).
    layer_ratios: "uniform" (every pruned layer loses ``pruning_ratio``) or "importance" (less important layers
        lose more: ratio_l = pruning_ratio * (1 - importance_spread * z_l) where z_l in [-1, 1] is the layer's
        centred importance divided by the largest deviation, then clipped and rebalanced to keep the mean).
    min_mlp_channels / mlp_round_to: floor on kept intermediate channels; kept count rounded up to a multiple.
    calibration_*: how a 1-D calibration stream is cut into blocks, how many are used, and the backward batch size.
    """

    pruning_ratio: float = 0.2
    importance: str = "taylor"
    prune_mlp: bool = True
    prune_attention: bool = True
    layer_start: int = 0
    layer_end: int | None = None
    layer_ratios: str = "uniform"
    importance_spread: float = 0.5
    min_mlp_channels: int = 8
    mlp_round_to: int = 1
    calibration_block_size: int = 128
    num_calibration_samples: int = 16
    calibration_batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        if self.importance not in ("taylor", "magnitude"):
            raise ValueError(f"importance must be 'taylor' or 'magnitude', got {self.importance!r}")
        if self.layer_ratios not in ("uniform", "importance"):
            raise ValueError(f"layer_ratios must be 'uniform' or 'importance', got {self.layer_ratios!r}")
        if not 0.0 <= self.importance_spread <= 1.0:
            raise ValueError(f"importance_spread must be in [0, 1], got {self.importance_spread}")
        if self.min_mlp_channels < 1 or self.mlp_round_to < 1:
            raise ValueError("min_mlp_channels and mlp_round_to must be >= 1")


# ----------------------------------------------------------------------------------------------- model access


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM (``model.model.layers``), checked for the Llama-family layout."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers: not a Llama-family decoder")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        ok = all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        ok = ok and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        if not ok:
            raise TypeError(f"layer {i} lacks self_attn.{{q,k,v,o}}_proj / mlp.{{gate,up,down}}_proj nn.Linear")
    return layers


def _head_dim(attn: nn.Module) -> int:
    return int(attn.head_dim)


def _attn_shape(attn: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of an attention module, read from its projection sizes."""
    hd = _head_dim(attn)
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd


def get_layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` as the weights are now."""
    shapes = []
    for layer in decoder_layers(model):
        n_q, n_kv = _attn_shape(layer.self_attn)
        shapes.append(
            {
                "num_attention_heads": n_q,
                "num_key_value_heads": n_kv,
                "intermediate_size": layer.mlp.up_proj.out_features,
            }
        )
    return shapes


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, tied tensors counted once (``parameters()`` already de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def embedding_parameter_count(model: nn.Module) -> int:
    """Parameters of the input embeddings and of an untied output head (pruning leaves both whole)."""
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    return sum({id(m.weight): m.weight.numel() for m in tables if m is not None}.values())


# ----------------------------------------------------------------------------------------------- slicing


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: output features, bias too) or columns (dim 1: input features) ``index`` of ``lin``."""
    index = index.to(lin.weight.device)
    old = [lin.weight, lin.bias]
    with torch.no_grad():
        lin.weight = nn.Parameter(lin.weight.index_select(dim, index).clone(), requires_grad=lin.weight.requires_grad)
        if dim == 0 and lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, index).clone(), requires_grad=lin.bias.requires_grad)
    for p in old:  # a memory-mapped checkpoint's pages of the replaced tensors leave the resident set
        if p is not None and p is not lin.weight and p is not lin.bias:
            release_file_pages(p.detach())
    if dim == 0:
        lin.out_features = int(index.numel())
    else:
        lin.in_features = int(index.numel())


def _set_attention_attrs(attn: nn.Module, n_q: int, n_kv: int) -> None:
    # v5's attention forward infers head counts from the projections (view(..., -1, head_dim)); the attention
    # kernels (eager / sdpa repeat_kv, pack_gqa) read only `num_key_value_groups`. The head counts are set too for
    # code that still reads them (older integrations, user code).
    attn.num_key_value_groups = n_q // n_kv
    attn.num_heads = n_q
    attn.num_key_value_heads = n_kv


def prune_attention_groups(attn: nn.Module, keep_groups: torch.Tensor) -> None:
    """Keep only KV groups ``keep_groups`` (sorted indices): their k/v head and the query heads that share it.

    Query head h uses kv head h // n_rep (repeat_kv expands kv head g to query positions g*n_rep .. g*n_rep+n_rep-1),
    so group g owns q rows [g*n_rep*hd, (g+1)*n_rep*hd), k/v rows [g*hd, (g+1)*hd) and the same o_proj columns as q.
    """
    hd = _head_dim(attn)
    n_q, n_kv = _attn_shape(attn)
    n_rep = n_q // n_kv
    keep_groups = keep_groups.sort().values.cpu()
    offs_kv = torch.arange(hd)
    kv_rows = (keep_groups[:, None] * hd + offs_kv[None, :]).reshape(-1)
    offs_q = torch.arange(n_rep * hd)
    q_rows = (keep_groups[:, None] * (n_rep * hd) + offs_q[None, :]).reshape(-1)
    _slice_linear(attn.q_proj, q_rows, 0)
    _slice_linear(attn.k_proj, kv_rows, 0)
    _slice_linear(attn.v_proj, kv_rows, 0)
    _slice_linear(attn.o_proj, q_rows, 1)
    _set_attention_attrs(attn, len(keep_groups) * n_rep, len(keep_groups))


def prune_mlp_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only intermediate channels ``keep``: rows of gate/up, columns of down."""
    keep = keep.sort().values.cpu()
    _slice_linear(mlp.gate_proj, keep, 0)
    _slice_linear(mlp.up_proj, keep, 0)
    _slice_linear(mlp.down_proj, keep, 1)
    mlp.intermediate_size = int(keep.numel())


# ----------------------------------------------------------------------------------------------- importance


def _elem_score(p: torch.Tensor, importance: str) -> torch.Tensor:
    """Element-wise importance of a parameter in float32: |w| or first-order Taylor |w * grad|."""
    w = p.detach().float()
    if importance == "magnitude":
        return w.abs()
    if p.grad is None:
        raise RuntimeError("taylor importance: parameter has no gradient (was the calibration backward run?)")
    return (w * p.grad.float()).abs()


def attention_group_scores(attn: nn.Module, importance: str) -> torch.Tensor:
    """Importance per KV group, shape (n_kv,): sum over the group's q/k/v rows (+ biases) and o_proj columns."""
    hd = _head_dim(attn)
    n_q, n_kv = _attn_shape(attn)
    scores = torch.zeros(n_kv, dtype=torch.float32, device=attn.q_proj.weight.device)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        # (n_kv * rows_per_group, hidden) -> (n_kv, rows_per_group * hidden)
        scores += _elem_score(lin.weight, importance).reshape(n_kv, -1).sum(1)
        if lin.bias is not None:
            scores += _elem_score(lin.bias, importance).reshape(n_kv, -1).sum(1)
    # o_proj weight: (hidden, n_q * hd) -> (hidden, n_kv, n_rep * hd); its bias is shared by all heads
    o = _elem_score(attn.o_proj.weight, importance)
    scores += o.reshape(o.shape[0], n_kv, (n_q // n_kv) * hd).sum((0, 2))
    return scores


def mlp_channel_scores(mlp: nn.Module, importance: str) -> torch.Tensor:
    """Importance per intermediate channel, shape (intermediate,): gate/up rows (+ biases) and down columns."""
    scores = _elem_score(mlp.gate_proj.weight, importance).sum(1) + _elem_score(mlp.up_proj.weight, importance).sum(1)
    for lin in (mlp.gate_proj, mlp.up_proj):
        if lin.bias is not None:
            scores += _elem_score(lin.bias, importance)
    return scores + _elem_score(mlp.down_proj.weight, importance).sum(0)


def _calibration_blocks(calibration_ids: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """(n_blocks, block) LongTensor: 2-D input is used as is, a 1-D stream is cut into non-overlapping blocks."""
    ids = calibration_ids.long()
    if ids.dim() == 1:
        n = min(ids.numel() // cfg.calibration_block_size, cfg.num_calibration_samples)
        if n == 0:
            raise ValueError(f"calibration stream has {ids.numel()} tokens < block size {cfg.calibration_block_size}")
        ids = ids[: n * cfg.calibration_block_size].view(n, cfg.calibration_block_size)
    elif ids.dim() == 2:
        ids = ids[: cfg.num_calibration_samples]
    else:
        raise ValueError(f"calibration_ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise ValueError("calibration blocks need at least 2 tokens")
    return ids


def _accumulate_taylor_grads(
    model: nn.Module, params: list[nn.Parameter], blocks: torch.Tensor, batch_size: int
) -> None:
    """Fill ``p.grad`` for ``params`` with the gradient of the mean LM loss over ``blocks``; other params frozen."""
    device = params[0].device
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        # weight each batch by its share of blocks so the summed grads are those of the mean over all blocks
        (loss * (batch.shape[0] / blocks.shape[0])).backward()


# ----------------------------------------------------------------------------------------------- ratios


def _rebalance(ratios: list[float], upper: list[float], target_mean: float) -> list[float]:
    """Clip ``ratios`` to [0, upper] and shift the unclipped ones (water-filling) so the mean stays ``target_mean``."""
    r = [min(max(x, 0.0), u) for x, u in zip(ratios, upper, strict=True)]
    for _ in range(4 * len(r) + 4):
        deficit = target_mean * len(r) - sum(r)
        if abs(deficit) < 1e-12:
            break
        free = [i for i, (x, u) in enumerate(zip(r, upper, strict=True)) if (x < u if deficit > 0 else x > 0.0)]
        if not free:  # every layer is at its bound: the target is unreachable
            break
        for i in free:
            r[i] = min(max(r[i] + deficit / len(free), 0.0), upper[i])
    return r


def allocate_layer_ratios(
    layer_scores: list[float], ratio: float, upper: list[float], mode: str, spread: float
) -> list[float]:
    """Per-layer pruning ratios: ``ratio`` everywhere ("uniform") or importance-scaled with mean ``ratio``."""
    if mode == "uniform" or ratio == 0.0 or len(layer_scores) < 2:
        return [min(ratio, u) for u in upper]
    s = torch.tensor(layer_scores, dtype=torch.float64)
    dev = s / s.mean() - 1.0
    z = dev / dev.abs().max() if dev.abs().max() > 0 else torch.zeros_like(dev)
    raw = [ratio * (1.0 - spread * float(zi)) for zi in z]  # low importance (z < 0) -> larger ratio
    return _rebalance(raw, upper, ratio)


def _n_removed(n: int, ratio: float) -> int:
    # round half up (Python's round() is half-to-even: 0.5 of 5 groups would remove 2, of 3 groups 2)
    return int(math.floor(ratio * n + 0.5))


def _n_keep_channels(n: int, ratio: float, cfg: PruneConfig) -> int:
    keep = n - _n_removed(n, ratio)
    if keep < n and cfg.mlp_round_to > 1:
        keep = min(n, int(math.ceil(keep / cfg.mlp_round_to)) * cfg.mlp_round_to)
    return max(keep, min(cfg.min_mlp_channels, n))


# ----------------------------------------------------------------------------------------------- pruning


def _importance_scores(
    model: nn.Module, layers: nn.ModuleList, pruned: list[int], cfg: PruneConfig, calibration_ids: torch.Tensor | None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per pruned layer, the importance of each KV group and of each MLP channel (Taylor: from gradients of a
    calibration pass; every requires_grad flag and the train/eval mode are restored afterwards)."""
    attn_scores: dict[int, torch.Tensor] = {}
    mlp_scores: dict[int, torch.Tensor] = {}
    targets: list[nn.Parameter] = []
    for i in pruned:
        mods = ([layers[i].self_attn] if cfg.prune_attention else []) + ([layers[i].mlp] if cfg.prune_mlp else [])
        targets += [p for m in mods for p in m.parameters()]
    was_training = model.training
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if cfg.importance == "taylor":
            if calibration_ids is None:
                raise ValueError("importance='taylor' needs calibration_ids")
            model.eval()  # no dropout: deterministic gradients
            for p, _ in saved_flags:
                p.requires_grad_(False)
            for p in targets:
                p.requires_grad_(True)
                p.grad = None
            blocks = _calibration_blocks(calibration_ids, cfg)
            with torch.enable_grad():
                _accumulate_taylor_grads(model, targets, blocks, cfg.calibration_batch_size)
        for i in pruned:
            if cfg.prune_attention:
                attn_scores[i] = attention_group_scores(layers[i].self_attn, cfg.importance).cpu()
            if cfg.prune_mlp:
                mlp_scores[i] = mlp_channel_scores(layers[i].mlp, cfg.importance).cpu()
    finally:
        for p in targets:
            p.grad = None
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    # Hold no reference to the unpruned tensors: each one is freed as its slice replaces it, so the peak stays
    # near the weights (plus one calibration batch for Taylor), not weights plus the pruned copy.
    del targets, saved_flags
    return attn_scores, mlp_scores


def _layer_ratios(
    layers: nn.ModuleList,
    pruned: list[int],
    cfg: PruneConfig,
    attn_scores: dict[int, torch.Tensor],
    mlp_scores: dict[int, torch.Tensor],
    active: bool,
) -> tuple[dict[int, float], dict[int, float]]:
    """The ratio each layer's attention and MLP lose (uniform, or by importance with the same mean)."""
    n_layers = len(layers)
    attn_ratio = {i: 0.0 for i in range(n_layers)}
    mlp_ratio = {i: 0.0 for i in range(n_layers)}
    if active and cfg.prune_attention:
        n_kv = [_attn_shape(layers[i].self_attn)[1] for i in pruned]
        upper = [(g - 1) / g for g in n_kv]  # keep at least one KV group
        scores = [float(attn_scores[i].sum()) for i in pruned]
        ratios = allocate_layer_ratios(scores, cfg.pruning_ratio, upper, cfg.layer_ratios, cfg.importance_spread)
        attn_ratio.update(zip(pruned, ratios, strict=True))
    if active and cfg.prune_mlp:
        sizes = [layers[i].mlp.up_proj.out_features for i in pruned]
        upper = [max(n - min(cfg.min_mlp_channels, n), 0) / n for n in sizes]
        scores = [float(mlp_scores[i].sum()) for i in pruned]
        ratios = allocate_layer_ratios(scores, cfg.pruning_ratio, upper, cfg.layer_ratios, cfg.importance_spread)
        mlp_ratio.update(zip(pruned, ratios, strict=True))
    return attn_ratio, mlp_ratio


def prune_model(model: nn.Module, cfg: PruneConfig, calibration_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Prune ``model`` in place and return a report.

    Layers in [cfg.layer_start, cfg.layer_end) lose KV groups (with their query heads) and/or MLP channels ranked
    by importance; the rest keep full width. ``model.config`` keeps its original (maximum) head counts and gains
    ``fulltune_layer_shapes``, which `save_pruned` / `load_pruned` use. Ratio 0 leaves every weight untouched.
    Taylor importance runs forward/backward on ``calibration_ids`` (2-D blocks, or a 1-D stream cut into
    ``cfg.calibration_block_size`` blocks) in eval mode; it clears ``.grad`` of the pruned layers' parameters and
    restores every ``requires_grad`` flag and the train/eval mode afterwards.

    Report: ``params_before``, ``params_after`` (and of the decoder blocks alone, ``block_params_*``;
    ``embedding_params``: input embeddings and an untied output head), the options, and ``layers``: per layer its kept
    ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` and the target ratios.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    start = cfg.layer_start
    end = n_layers if cfg.layer_end is None else min(cfg.layer_end, n_layers)
    if not 0 <= start <= end:
        raise ValueError(f"bad layer range [{start}, {end}) for {n_layers} layers")
    pruned = list(range(start, end))
    params_before = parameter_count(model)
    blocks_before = sum(parameter_count(layer) for layer in layers)
    active = cfg.pruning_ratio > 0.0 and bool(pruned) and (cfg.prune_attention or cfg.prune_mlp)

    attn_scores, mlp_scores = _importance_scores(model, layers, pruned, cfg, calibration_ids) if active else ({}, {})
    attn_ratio, mlp_ratio = _layer_ratios(layers, pruned, cfg, attn_scores, mlp_scores, active)

    for i in pruned if active else []:
        if i in attn_scores:
            n_kv = attn_scores[i].numel()
            n_keep = max(1, n_kv - _n_removed(n_kv, attn_ratio[i]))
            if n_keep < n_kv:
                prune_attention_groups(layers[i].self_attn, attn_scores[i].topk(n_keep).indices)
        if i in mlp_scores:
            n_ch = mlp_scores[i].numel()
            n_keep = _n_keep_channels(n_ch, mlp_ratio[i], cfg)
            if n_keep < n_ch:
                prune_mlp_channels(layers[i].mlp, mlp_scores[i].topk(n_keep).indices)

    shapes = get_layer_shapes(model)
    setattr(model.config, SHAPES_KEY, shapes)
    per_layer = [
        {"layer": i, "pruned": i in pruned and active, "attention_ratio": attn_ratio[i], "mlp_ratio": mlp_ratio[i], **s}
        for i, s in enumerate(shapes)
    ]
    return {
        "params_before": params_before,
        "params_after": parameter_count(model),
        "block_params_before": blocks_before,
        "block_params_after": sum(parameter_count(layer) for layer in layers),
        "embedding_params": embedding_parameter_count(model),
        "config": asdict(cfg),
        "layer_range": [start, end],
        "layers": per_layer,
    }
