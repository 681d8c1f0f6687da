"""What trains: full / partial / linear_probe / LoRA, the progressive-unfreezing schedule, and the optimizer's
parameter groups (layer-wise LR decay, no weight decay on biases and norms).

Freezing uses `requires_grad` only; the optimizer holds every parameter that may ever train, so unfreezing needs
no rebuild and a resumed run has the same optimizer layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from fulltune.config import Config, UnfreezeStep
from fulltune.config.methods import METHODS as METHODS  # the method names, where --help reads them
from fulltune.errors import ConfigError
from fulltune.model.layermap import LayerMap, is_under, layer_map, strip_peft_prefix
from fulltune.model.lora import LORA_METHODS

HEAD_ALIASES = ("classifier", "head")


# ---------------------------------------------------------------------------------------------------------- LoRA


# ---------------------------------------------------------------------------------------------------------- plan


@dataclass
class TrainablePlan:
    """Which parameters the method may ever train (`eligible`), and which train at a given epoch."""

    lmap: LayerMap
    eligible: set[str]
    schedule: list[UnfreezeStep]

    def trainable_at(self, epoch: int) -> set[str]:
        if not self.schedule:
            return set(self.eligible)
        names: set[str] = set()
        for step in self.schedule:
            if step.epoch <= epoch:
                names |= self.resolve(step.layers)
        return names & self.eligible

    def resolve(self, layers: list[str]) -> set[str]:
        """Parameter names that schedule entries select: 'all', 'classifier'/'head', or module prefixes."""
        out: set[str] = set()
        for layer in layers:
            if layer == "all":
                out |= set(self.lmap.layer_of)
            elif layer in HEAD_ALIASES and self.lmap.head:
                out |= self.lmap.head
            else:
                out |= {n for n in self.lmap.layer_of if is_under(strip_peft_prefix(n), layer)}
        return out


def layer_names(lmap: LayerMap) -> list[str]:
    """The names a user may put in an unfreeze schedule, bottom to top."""
    return ["classifier", "all"] + lmap.names()


def _auto_schedule(lmap: LayerMap, every: int) -> list[UnfreezeStep]:
    """ULMFiT-style: the head first, then one more block from the top every `every` epochs (the top block
    together with what sits above it: final norm, pooler), and the embeddings last."""
    steps = [UnfreezeStep(epoch=0, layers=["classifier"])]
    for k, prefix in enumerate(reversed(lmap.block_prefixes), start=1):
        steps.append(UnfreezeStep(epoch=k * every, layers=[prefix] + (lmap.top_prefixes if k == 1 else [])))
    steps.append(UnfreezeStep(epoch=(lmap.num_layers + 1) * every, layers=["all"]))
    return steps


def probe_schedule(cfg: Config) -> list[UnfreezeStep]:
    """LP-FT (method.head_init=linear_probe): the head alone for head_init_epochs, then all the method trains.

    An epoch schedule like progressive unfreezing, so a resumed run recomputes what trains from the epoch alone.
    """
    if cfg.method.head_init != "linear_probe":
        return []
    return [
        UnfreezeStep(epoch=0, layers=["classifier"]),
        UnfreezeStep(epoch=cfg.method.head_init_epochs, layers=["all"]),
    ]


def _proportional_schedule(lmap: LayerMap, num_epochs: int) -> list[UnfreezeStep]:
    """The CLIP fine-tuning script's rule: at epoch e the top int(e / num_epochs * L) blocks train, the head always
    (the top block brings what sits above the blocks with it); the embeddings stay frozen, as in that script."""
    steps = [UnfreezeStep(epoch=0, layers=["classifier"])]
    blocks = list(reversed(lmap.block_prefixes))
    done = 0
    for epoch in range(1, num_epochs):
        k = min(int(epoch / num_epochs * len(blocks)), len(blocks))
        if k > done:
            new = blocks[done:k] + (lmap.top_prefixes if done == 0 else [])
            steps.append(UnfreezeStep(epoch=epoch, layers=new))
            done = k
    return steps


def _eligible(model: nn.Module, cfg: Config, lmap: LayerMap) -> set[str]:
    method = cfg.method
    names = [n for n, _ in model.named_parameters()]
    if method.name in LORA_METHODS:
        # peft has already frozen the base: eligible is what it left trainable (adapters and head copies).
        eligible = {n for n, p in model.named_parameters() if p.requires_grad}
    elif method.name == "linear_probe":
        eligible = set(lmap.head)
        if not eligible:
            raise ConfigError("method.name=linear_probe: this model has no classification head to train")
    elif method.name == "partial":
        k = method.trainable_layers
        if k > lmap.num_layers:
            raise ConfigError(f"method.trainable_layers={k} but the model has only {lmap.num_layers} blocks")
        # Blocks L-K+1..L, what sits above them (layer L+1) and the head (also mapped to L+1).
        eligible = {n for n in names if lmap.layer_of[n] > lmap.num_layers - k}
    else:
        eligible = set(names)
    if method.freeze:
        try:
            patterns = [re.compile(p) for p in method.freeze]
        except re.error as err:
            raise ConfigError(f"method.freeze: bad regex ({err})") from None
        eligible = {n for n in eligible if not any(p.search(strip_peft_prefix(n)) for p in patterns)}
    if not eligible:
        raise ConfigError(f"method.name={method.name} with method.freeze={method.freeze} leaves nothing to train")
    return eligible


def plan_trainable(model: nn.Module, cfg: Config) -> TrainablePlan:
    """The eligible set from method.name (and method.freeze), the schedule from training.progressive_unfreezing."""
    lmap = layer_map(model)
    eligible = _eligible(model, cfg, lmap)
    pu = cfg.training.progressive_unfreezing
    probe = probe_schedule(cfg)
    if not pu.enabled and not probe:
        return TrainablePlan(lmap, eligible, [])
    if probe:
        schedule = probe
    elif pu.unfreeze_schedule:
        schedule = pu.unfreeze_schedule
    elif pu.auto == "proportional":
        schedule = _proportional_schedule(lmap, cfg.training.num_epochs)
    else:
        schedule = _auto_schedule(lmap, int(pu.auto or 1))
    plan = TrainablePlan(lmap, eligible, schedule)
    for step in schedule:
        for layer in step.layers:
            selected = plan.resolve([layer])
            if not selected:
                raise ConfigError(
                    f"training.progressive_unfreezing: layer '{layer}' (epoch {step.epoch}) matches no parameter; "
                    f"layer names of this model: {', '.join(layer_names(lmap))}"
                )
            if not selected & eligible:
                raise ConfigError(
                    f"training.progressive_unfreezing: layer '{layer}' (epoch {step.epoch}) holds no parameter that "
                    f"method.name={cfg.method.name} trains"
                )
    if not plan.trainable_at(0):
        raise ConfigError(
            "training.progressive_unfreezing: nothing trains in epoch 0; the schedule needs an entry with epoch: 0 "
            "(e.g. {epoch: 0, layers: [classifier]})"
        )
    return plan


def unfreeze_counts(model: nn.Module, plan: TrainablePlan) -> dict[int, int]:
    """{epoch: parameters that train from that epoch on} for epoch 0 and each epoch at which the schedule changes
    what trains; without a schedule {0: every parameter the method trains}."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    counts: dict[int, int] = {}
    previous: set[str] | None = None
    for epoch in sorted({0} | {step.epoch for step in plan.schedule}):
        names = plan.trainable_at(epoch)
        if names != previous:
            counts[epoch] = sum(sizes[n] for n in names)
            previous = names
    return counts


def unfrozen_at(plan: TrainablePlan, epoch: int) -> str | None:
    """What starts to train at `epoch` ('block2+top', 'head', ...; the labels of the LR groups), None when
    nothing new does (and at epoch 0, where training starts)."""
    new = plan.trainable_at(epoch) - plan.trainable_at(epoch - 1) if epoch > 0 and plan.schedule else set()
    if not new:
        return None
    lmap = plan.lmap
    layers = {lmap.layer_of[n] for n in new if n not in lmap.head}
    return _group_label(layers, any(n in lmap.head for n in new), lmap.num_layers)


def apply_trainable(model: nn.Module, names: set[str]) -> bool:
    """Set requires_grad: True exactly for `names`. Returns whether any flag changed."""
    changed = False
    for n, p in model.named_parameters():
        changed |= p.requires_grad != (n in names)
        p.requires_grad_(n in names)
    return changed


# ---------------------------------------------------------------------------------------------------------- groups


def _group_label(layers: set[int], has_head: bool, num_layers: int) -> str:
    """'embeddings', 'block3', 'block6+top', 'blocks1-6', 'body', 'head', 'all' ... from the layer indices held."""
    blocks = sorted(i for i in layers if 1 <= i <= num_layers)
    if layers == set(range(num_layers + 2)):
        return "all" if has_head else "body"
    parts = ["embeddings"] if 0 in layers else []
    if blocks:
        contiguous = blocks == list(range(blocks[0], blocks[-1] + 1))
        parts.append(
            f"block{blocks[0]}"
            if len(blocks) == 1
            else f"blocks{blocks[0]}-{blocks[-1]}"
            if contiguous
            else "blocks" + ",".join(map(str, blocks))
        )
    if num_layers + 1 in layers:
        parts.append("top")
    if has_head:
        parts.append("head")
    return "+".join(parts)


_THIRDS = ("bottom", "middle", "top")


def layer_group_rates(lmap: LayerMap, rates: dict[str, float]) -> dict[int, float]:
    """training.layer_groups_lr as {layer index 0..L+1 (L+1 also the head, see `layer_group_rate`): rate}.

    Keys: bottom / middle / top (thirds of the L blocks; bottom also holds the embeddings, top what sits above the
    blocks), "embeddings", block ranges "i-j" or "i" (0-based, inclusive), and "head" (read by the caller).
    """
    L = lmap.num_layers
    out: dict[int, float] = {}
    for key, rate in rates.items():
        if key == "head":
            continue
        if key in _THIRDS:
            which = _THIRDS.index(key)
            layers = [i for i in range(1, L + 1) if min(2, (i - 1) * 3 // max(L, 1)) == which]
            layers += [0] if which == 0 else [L + 1] if which == 2 else []
        elif key == "embeddings":
            layers = [0]
        elif re.fullmatch(r"\d+(-\d+)?", key):
            lo, _, hi = key.partition("-")
            first, last = int(lo), int(hi or lo)
            if not first <= last < L:
                raise ConfigError(f"training.layer_groups_lr.{key}: blocks are numbered 0..{L - 1} in this model")
            layers = list(range(first + 1, last + 2))
        else:
            raise ConfigError(
                f"training.layer_groups_lr.{key}: expected bottom, middle, top, head, embeddings or a "
                f"block range such as 0-3 (this model has {L} blocks)"
            )
        for i in layers:
            out[i] = rate
    return out


def param_groups(model: nn.Module, plan: TrainablePlan, cfg: Config) -> list[dict[str, Any]]:
    """Optimizer groups over every eligible parameter, one per (LR scale, weight decay on/off), bottom to top.

    Each group carries `lr_scale` (block i of L: decay ** (L - i); head: head_lr_mult); schedules multiply it,
    never overwrite it. Weight decay applies to matrices only: biases, norm weights and learned vectors (CLIP's
    class embedding, ViT's cls token) get none.
    """
    t = cfg.training
    decay = t.layerwise_lr.decay_rate if t.layerwise_lr.enabled else 1.0
    lmap = plan.lmap
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    explicit = layer_group_rates(lmap, t.layer_groups_lr) if t.layer_groups_lr else {}
    for name, p in model.named_parameters():
        if name not in plan.eligible:
            continue
        scale = lmap.scale(name, decay, t.head_lr_mult)
        if t.layer_groups_lr:  # explicit rates (the CLIP guide's discriminative fine-tuning), as multiples of the base
            rate = t.layer_groups_lr.get("head") if name in lmap.head else explicit.get(lmap.layer_of[name])
            scale = scale if rate is None else rate / t.base_learning_rate
        # Matrices decay; vectors do not, whatever their padding dims: ViT's cls token is (1, 1, hidden).
        decayed = sum(d > 1 for d in p.shape) >= 2
        group = groups.setdefault(
            (round(scale, 12), decayed),
            {
                "params": [],
                "names": [],
                "lr_scale": scale,
                "weight_decay": t.weight_decay if decayed else 0.0,
                "_layers": set(),
                "_head": False,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
        if name in lmap.head:
            group["_head"] = True
        else:
            group["_layers"].add(lmap.layer_of[name])
    ordered = []
    for (_, decayed), g in groups.items():
        layers, has_head = g.pop("_layers"), g.pop("_head")
        g["name"] = _group_label(layers, has_head, lmap.num_layers) + ("" if decayed else "_no_decay")
        # Bottom to top by the lowest layer held (a head-only group last), decayed before not.
        ordered.append(((min(layers) if layers else lmap.num_layers + 2, not decayed), g))
    return [g for _, g in sorted(ordered, key=lambda pair: pair[0])]


def describe_groups(groups: list[dict[str, Any]], base_lr: float) -> str:
    lines = [f"{'group':<26}{'tensors':>8}{'params':>12}{'lr':>12}{'wd':>8}"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lr = base_lr * g["lr_scale"]
        lines.append(f"{g['name']:<26}{len(g['params']):>8}{n:>12,}{lr:>12.3g}{g['weight_decay']:>8.3g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- preparation
