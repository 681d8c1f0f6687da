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

from fulltune.config import Config, ConfigError, UnfreezeStep
from fulltune.models import LayerMap, layer_map, strip_peft_prefix

# LoRA target modules per family: attention and MLP projections.
LORA_TARGETS: dict[str, list[str]] = {
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "vit": ["query", "key", "value", "dense"],
    "bert": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
HEAD_MODULES = ("classifier", "pre_classifier", "score")


def lora_targets(model: nn.Module) -> list[str]:
    model_type = getattr(model.config, "model_type", "")
    for family, targets in LORA_TARGETS.items():
        if family in model_type:
            return targets
    if model_type in ("roberta", "electra", "deberta", "distilbert", "deit", "dinov2", "beit"):
        return LORA_TARGETS["bert" if model_type != "distilbert" else "bert"]
    if model_type in ("qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3"):
        return LORA_TARGETS["llama"]
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ConfigError(
        f"no default LoRA targets for model type '{model_type}'; set method.lora.target_modules "
        f"(linear layers in this model: {', '.join(linear_names)})"
    )


def wrap_lora(model: nn.Module, cfg: Config, task: str) -> nn.Module:
    """Wrap with peft LoRA adapters; the classification head trains fully (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.method.lora
    heads = [name for name in HEAD_MODULES if hasattr(model, name)] if task != "causal_lm" else []
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules or lora_targets(model),
        modules_to_save=heads or None,
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


@dataclass
class Plan:
    """Which parameters the method may ever train, and which train at a given epoch."""

    lmap: LayerMap
    eligible: set[str]
    schedule: list[UnfreezeStep]

    def trainable_at(self, epoch: int) -> set[str]:
        if not self.schedule:
            return set(self.eligible)
        names: set[str] = set()
        for step in self.schedule:
            if step.epoch <= epoch:
                names |= self._resolve(step.layers)
        return names & self.eligible

    def _resolve(self, layers: list[str]) -> set[str]:
        out: set[str] = set()
        for layer in layers:
            if layer == "all":
                out |= self.eligible
            elif layer in ("classifier", "head") and self.lmap.head:
                out |= self.lmap.head
            else:
                out |= {n for n in self.lmap.layer_of if _prefix_match(strip_peft_prefix(n), layer)}
        return out


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_names(lmap: LayerMap) -> list[str]:
    """The names a user may put in an unfreeze schedule."""
    return ["classifier", "all"] + lmap.block_prefixes


def _auto_schedule(lmap: LayerMap, every: int) -> list[UnfreezeStep]:
    """Head first, then one more block from the top every `every` epochs, then everything."""
    steps = [UnfreezeStep(epoch=0, layers=["classifier"])]
    for k, prefix in enumerate(reversed(lmap.block_prefixes), start=1):
        steps.append(UnfreezeStep(epoch=k * every, layers=[prefix]))
    steps.append(UnfreezeStep(epoch=(len(lmap.block_prefixes) + 1) * every, layers=["all"]))
    return steps


def plan_method(model: nn.Module, cfg: Config) -> Plan:
    """Decide the eligible set from method.name and the schedule from training.progressive_unfreezing."""
    lmap = layer_map(model)
    names = [n for n, _ in model.named_parameters()]
    method = cfg.method
    if method.name == "lora":
        # peft has already frozen the base; eligible = what it left trainable (adapters + head copies).
        eligible = {n for n, p in model.named_parameters() if p.requires_grad}
    elif method.name == "linear_probe":
        eligible = set(lmap.head)
        if not eligible:
            raise ConfigError("method.name=linear_probe: this model has no classification head to train")
    elif method.name == "partial":
        k = method.trainable_layers
        bottom = lmap.num_layers - k
        eligible = {n for n in names if lmap.layer_of[n] > bottom}
        if k > lmap.num_layers:
            raise ConfigError(f"method.trainable_layers={k} but the model has only {lmap.num_layers} blocks")
    else:
        eligible = set(names)
    if method.freeze:
        try:
            patterns = [re.compile(p) for p in method.freeze]
        except re.error as err:
            raise ConfigError(f"method.freeze: bad regex ({err})") from None
        eligible = {n for n in eligible if not any(p.search(strip_peft_prefix(n)) for p in patterns)}
    pu = cfg.training.progressive_unfreezing
    schedule: list[UnfreezeStep] = []
    if pu.enabled:
        schedule = pu.unfreeze_schedule or _auto_schedule(lmap, pu.auto or 1)
        plan = Plan(lmap, eligible, [])
        for step in schedule:
            for layer in step.layers:
                if not plan._resolve([layer]):
                    raise ConfigError(
                        f"training.progressive_unfreezing: layer '{layer}' matches no parameter; "
                        f"layer names of this model: {', '.join(layer_names(lmap))}"
                    )
    return Plan(lmap, eligible, schedule)


def apply_trainable(model: nn.Module, names: set[str]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def param_groups(model: nn.Module, plan: Plan, cfg: Config) -> list[dict[str, Any]]:
    """Optimizer groups over every eligible parameter, keyed by (LR scale, weight decay on/off).

    Each group carries `lr_scale`; schedules multiply it, never overwrite it. Weight decay applies to matrices
    only: biases, norm weights and other 1-D parameters get none.
    """
    t = cfg.training
    decay = t.layerwise_lr.decay_rate if t.layerwise_lr.enabled else 1.0
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if name not in plan.eligible:
            continue
        scale = plan.lmap.scale(name, decay, t.head_lr_mult)
        decayed = p.ndim >= 2
        key = (round(scale, 12), decayed)
        if key not in groups:
            layer = plan.lmap.layer_of[name]
            label = "head" if name in plan.lmap.head else f"layer{layer}"
            groups[key] = {
                "params": [],
                "names": [],
                "lr_scale": scale,
                "weight_decay": t.weight_decay if decayed else 0.0,
                "name": f"{label}{'' if decayed else '_no_decay'}",
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # Order from the bottom of the network to the top so logs read naturally.
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["name"]))


def describe_groups(groups: list[dict[str, Any]], base_lr: float) -> str:
    lines = [f"{'group':<22}{'tensors':>8}{'params':>12}{'lr':>12}{'wd':>8}"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<22}{len(g['params']):>8}{n:>12,}{base_lr * g['lr_scale']:>12.3g}{g['weight_decay']:>8.3g}")
    return "\n".join(lines)
