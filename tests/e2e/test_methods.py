"""Methods on tiny random models: layer maps per family, layer-wise LR decay through the real loop, partial and
linear probe touch exactly their tensors, LoRA exports a plain model with the adapter's logits, an unfreeze
schedule resumes bit-identically, gradient checkpointing gives the same gradients."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_CLIP, TINY_LLAMA, TINY_VIT, tiny_bert_text_config
from safetensors.torch import load_file

from fulltune.config import ConfigError, load_config
from fulltune.files.safestate import load_state
from fulltune.model.build import build_model
from fulltune.model.layermap import layer_map
from fulltune.model.lora import wrap_lora
from fulltune.model.prepare import enable_gradient_checkpointing
from fulltune.model.trainable import plan_trainable
from fulltune.training import trainer as train_module
from fulltune.training.optim import lr_factor
from fulltune.training.trainer import setup, train

BERT_LAYERS = 2  # TINY_BERT's blocks


_text_cfg = tiny_bert_text_config


def _model(tiny: dict, task: str, **extra: object):
    cfg = load_config(None, {"model.tiny_config": tiny, "model.dropout": 0.0, **extra})
    return build_model(cfg, task, None if task == "causal_lm" else ["neg", "pos"]).model, cfg


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ layer maps


@pytest.mark.parametrize(
    "tiny,task,expected,head,blocks",
    [
        (
            TINY_BERT,
            "text_classification",
            {
                "bert.embeddings.word_embeddings.weight": 0,
                "bert.embeddings.LayerNorm.bias": 0,
                "bert.encoder.layer.0.attention.self.query.weight": 1,
                "bert.encoder.layer.1.output.dense.bias": 2,
                "bert.pooler.dense.weight": 3,
            },
            {"classifier.weight", "classifier.bias"},
            ["bert.encoder.layer.0", "bert.encoder.layer.1"],
        ),
        (
            TINY_CLIP,
            "image_classification",
            {
                "vision_model.embeddings.class_embedding": 0,
                "vision_model.embeddings.patch_embedding.weight": 0,
                "vision_model.pre_layrnorm.weight": 0,
                "vision_model.encoder.layers.0.self_attn.q_proj.weight": 1,
                "vision_model.encoder.layers.1.mlp.fc2.bias": 2,
                "vision_model.post_layernorm.weight": 3,
            },
            {"classifier.weight", "classifier.bias"},
            ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1"],
        ),
        (
            TINY_VIT,
            "image_classification",
            {
                "vit.embeddings.cls_token": 0,
                "vit.embeddings.patch_embeddings.projection.weight": 0,
                "vit.layers.0.attention.q_proj.weight": 1,
                "vit.layers.1.mlp.fc1.weight": 2,
                "vit.layernorm.weight": 3,
            },
            {"classifier.weight", "classifier.bias"},
            ["vit.layers.0", "vit.layers.1"],
        ),
        (
            TINY_LLAMA,
            "causal_lm",
            {
                "model.embed_tokens.weight": 0,
                "model.layers.0.self_attn.q_proj.weight": 1,
                "model.layers.1.mlp.down_proj.weight": 2,
                "model.norm.weight": 3,
            },
            {"lm_head.weight"},
            ["model.layers.0", "model.layers.1"],
        ),
    ],
    ids=["bert", "clip", "vit", "llama"],
)
def test_layer_map_per_family(tiny, task, expected, head, blocks):
    model, _ = _model(tiny, task)
    lmap = layer_map(model)
    assert lmap.num_layers == 2
    assert lmap.block_prefixes == blocks
    assert lmap.head == head
    assert set(lmap.layer_of) == {n for n, _ in model.named_parameters()}
    for name, layer in expected.items():
        assert lmap.layer_of[name] == layer, name
    # Every block parameter maps to its block's position; nothing else sits in 1..L.
    for name, layer in lmap.layer_of.items():
        inside = [i for i, p in enumerate(blocks, start=1) if name.startswith(p + ".")]
        assert (inside == [layer]) if inside else layer in (0, 3), name


def test_layer_map_sees_through_lora():
    model, cfg = _model(TINY_BERT, "text_classification", **{"method.name": "lora"})
    lmap = layer_map(wrap_lora(model, cfg, "text_classification"))
    prefix = "base_model.model."
    assert lmap.layer_of[prefix + "bert.encoder.layer.1.attention.self.query.lora_A.default.weight"] == 2
    assert lmap.layer_of[prefix + "bert.embeddings.word_embeddings.weight"] == 0
    assert prefix + "classifier.modules_to_save.default.weight" in lmap.head
    assert lmap.block_prefixes == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def test_bad_unfreeze_layer_lists_the_valid_names():
    model, _ = _model(TINY_BERT, "text_classification")
    schedule = {
        "enabled": True,
        "unfreeze_schedule": [
            {"epoch": 0, "layers": ["classifier"]},
            {"epoch": 1, "layers": ["bert.encoder.layers.1"]},
        ],
    }
    cfg = load_config(None, {"training.progressive_unfreezing": schedule})
    with pytest.raises(ConfigError) as err:
        plan_trainable(model, cfg)
    message = str(err.value)
    assert "'bert.encoder.layers.1'" in message
    for name in ("classifier", "all", "bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler"):
        assert name in message
    # A schedule that trains nothing in epoch 0 is refused too (backward would have nothing to do).
    late = load_config(
        None,
        {"training.progressive_unfreezing": {"enabled": True, "unfreeze_schedule": [{"epoch": 1, "layers": ["all"]}]}},
    )
    with pytest.raises(ConfigError, match="epoch 0"):
        plan_trainable(model, late)


def test_auto_schedule_unfreezes_from_the_top():
    model, _ = _model(TINY_BERT, "text_classification")
    cfg = load_config(None, {"training.progressive_unfreezing": {"enabled": True, "auto": 2}})
    plan = plan_trainable(model, cfg)
    every = set(plan.lmap.layer_of)
    assert plan.trainable_at(0) == plan.trainable_at(1) == plan.lmap.head
    assert {plan.lmap.layer_of[n] for n in plan.trainable_at(2)} == {2, 3}  # top block, pooler and head
    assert {plan.lmap.layer_of[n] for n in plan.trainable_at(4)} == {1, 2, 3}
    assert plan.trainable_at(6) == every


# ------------------------------------------------------------------------------------------------ LR groups


def _hand_scale(name: str, decay: float, head_mult: float) -> float:
    """LR multiplier of a tiny BERT parameter, written out by hand: block i of L gets decay ** (L - i)."""
    if name.startswith("classifier."):
        return head_mult
    if name.startswith("bert.embeddings."):
        return decay**BERT_LAYERS
    if name.startswith("bert.pooler."):
        return 1.0  # above the top block: the top block's rate
    block = int(re.match(r"bert\.encoder\.layer\.(\d+)\.", name).group(1)) + 1
    return decay ** (BERT_LAYERS - block)


def test_layer_decay_lr_of_every_group_at_every_step(tmp_path, text_data, monkeypatch):
    base_lr, decay, head_mult, total, warm = 1e-3, 0.5, 3.0, 4, 1
    cfg = _text_cfg(
        tmp_path / "run",
        text_data,
        data__batch_size=8,
        training__max_steps=total,
        training__warmup_steps=warm,
        training__base_learning_rate=base_lr,
        training__head_lr_mult=head_mult,
        training__layerwise_lr={"enabled": True, "decay_rate": decay},
        training__weight_decay=0.05,
        checkpoint__save_every_epochs=0,
        checkpoint__save_best=False,
    )
    runs, seen = [], []
    real_setup, real_set_lr = train_module.Trainer.setup, train_module.set_lr

    def spy_setup(self):
        runs.append(real_setup(self))
        return runs[-1]

    def spy_set_lr(optimizer, lr, factor):
        real_set_lr(optimizer, lr, factor)
        seen.append({id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]})

    monkeypatch.setattr(train_module.Trainer, "setup", spy_setup)
    monkeypatch.setattr(train_module, "set_lr", spy_set_lr)
    train(cfg)
    names = {id(p): n for n, p in runs[0].model.named_parameters()}
    assert len(seen) == total and all(set(s) == set(names) for s in seen)
    factors = [lr_factor(step, total, warm, "cosine") for step in range(total)]
    assert len(set(factors)) == total  # warmup, peak and decay: four different points of the schedule
    for step, lrs in enumerate(seen):
        for pid, (lr, wd) in lrs.items():
            name = names[pid]
            assert lr == pytest.approx(base_lr * factors[step] * _hand_scale(name, decay, head_mult), rel=1e-12), name
            vector = name.endswith(".bias") or "LayerNorm" in name
            assert wd == (0.0 if vector else 0.05), name


# ------------------------------------------------------------------------------------------------ what trains


@pytest.mark.parametrize("method", ["partial", "linear_probe"])
def test_only_the_intended_tensors_change(tmp_path, text_data, method):
    # partial: the top block, with one of its norms frozen by regex on top.
    extra = {"method__trainable_layers": 1, "method__freeze": [r"layer\.1\.output\.LayerNorm"]}
    cfg = _text_cfg(
        tmp_path / "run",
        text_data,
        method__name=method,
        data__batch_size=8,
        training__max_steps=2,
        training__warmup_steps=0,
        training__base_learning_rate=1e-2,
        training__weight_decay=0.1,
        checkpoint__save_best=False,
        **(extra if method == "partial" else {}),
    )
    initial = {n: p.detach().clone() for n, p in setup(cfg).model.named_parameters()}
    train(cfg)
    final = _weights(tmp_path / "run" / "checkpoint-step-2")
    if method == "partial":

        def intended(n: str) -> bool:
            top = n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))
            return top and not n.startswith("bert.encoder.layer.1.output.LayerNorm")
    else:

        def intended(n: str) -> bool:
            return n.startswith("classifier.")

    changed = {n for n in initial if not torch.equal(initial[n], final[n])}
    # Frozen tensors stay bit-identical although weight decay is on: AdamW skips parameters without a gradient.
    assert changed == {n for n in initial if intended(n)}


def test_lora_export_loads_plain_and_gives_the_adapter_logits(tmp_path, text_data, capsys):
    cfg = _text_cfg(
        tmp_path / "run",
        text_data,
        method__name="lora",
        method__lora={"r": 4, "alpha": 8, "dropout": 0.0},
        model__dropout=0.0,
        data__batch_size=8,
        training__max_steps=2,
        training__base_learning_rate=1e-2,
        training__gradient_checkpointing=True,
        checkpoint__save_best=False,
    )
    summary = train(cfg)
    assert summary["trainable_parameters"] < summary["total_parameters"] / 10
    folder = tmp_path / "run" / "checkpoint-step-2"
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("lora" in k for k in _weights(folder))  # merged: a plain BERT state dict
    # The adapter model itself: a fresh peft model with the trained adapter and head restored by resume.
    run = setup(cfg, resume=str(folder))
    model, tok = run.model.eval(), run.bundle.tokenizer
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the update is not zero
    texts = ["a good film", "terrible acting all round number 7"]
    with torch.no_grad():
        expected = model(**tok(texts, return_tensors="pt", padding=True)).logits
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOGITS, str(folder), json.dumps(texts)], capture_output=True, text=True, check=True
    )
    plain = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    # evaluate and predict take the LoRA run's export like any other.
    from fulltune.cli import main
    from fulltune.eval.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(folder, data_dir=str(text_data), split="test", output_dir=tmp_path / "eval")
    assert metrics["examples"] == 8
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(folder), "--text", "a good film", "--top_k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top_k"]) == 2


PLAIN_LOGITS = """
import sys, json, torch
sys.modules['fulltune'] = None  # prove fulltune is not needed
import transformers as tf
path, texts = sys.argv[1], json.loads(sys.argv[2])
tok = tf.AutoTokenizer.from_pretrained(path)
model = tf.AutoModelForSequenceClassification.from_pretrained(path).eval()
with torch.no_grad():
    print(json.dumps(model(**tok(texts, return_tensors='pt', padding=True)).logits.tolist()))
"""


# ------------------------------------------------------------------------------------------------ unfreezing


def test_unfreeze_schedule_resumes_bit_identical(tmp_path, text_data):
    schedule = {
        "enabled": True,
        "unfreeze_schedule": [
            {"epoch": 0, "layers": ["classifier"]},
            {"epoch": 1, "layers": ["bert.encoder.layer.1", "bert.pooler"]},
            {"epoch": 2, "layers": ["all"]},
        ],
    }

    def make(out: Path):
        # 16 examples in batches of 8: 2 steps per epoch; step 3 is mid-epoch 1, after one unfreeze, before the next.
        return _text_cfg(
            out,
            text_data,
            data__max_samples=16,
            data__batch_size=8,
            training__num_epochs=3,
            training__weight_decay=0.1,
            training__layerwise_lr={"enabled": True, "decay_rate": 0.8},
            training__progressive_unfreezing=schedule,
            checkpoint__save_every_steps=3,
            checkpoint__keep_last=0,
            checkpoint__save_best=False,
        )

    train(make(tmp_path / "full"))
    full = tmp_path / "full"
    # Epoch 0 trained the head only; at step 3 block 1 and the pooler have moved too, the rest is untouched.
    epoch1, step3 = _weights(full / "checkpoint-epoch-1"), _weights(full / "checkpoint-step-3")
    moved = {n for n in epoch1 if not torch.equal(epoch1[n], step3[n])}
    assert moved == {n for n in epoch1 if n.startswith(("classifier.", "bert.encoder.layer.1.", "bert.pooler."))}
    # Only parameters that have trained hold optimizer state (torch's AdamW skips those without a gradient).
    assert set(_optimizer_state(full / "checkpoint-step-3")) == moved

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-step-3", resumed / "checkpoint-step-3")
    train(make(resumed), resume="auto")
    a, b = _weights(full / "checkpoint-epoch-3"), _weights(resumed / "checkpoint-epoch-3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _optimizer_state(full / "checkpoint-epoch-3"), _optimizer_state(resumed / "checkpoint-epoch-3")
    assert sa.keys() == sb.keys() == a.keys()
    for name in sa:
        for key, value in sa[name].items():
            assert torch.equal(value, sb[name][key]), (name, key)


def _optimizer_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter AdamW state of a checkpoint, keyed by parameter name."""
    blob = load_state(folder / "training_state", "optimizer")
    names = blob["param_names"]  # in the optimizer's order, which is what the state's indices count
    return {names[i]: s for i, s in blob["state"]["state"].items()}


# ------------------------------------------------------------------------------------------------ checkpointing


def _inputs(tiny: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if tiny is TINY_BERT or tiny is TINY_LLAMA:
        return {"input_ids": torch.randint(5, 1000, (2, 9), generator=gen)}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}


@pytest.mark.parametrize(
    "tiny,task,lora",
    [
        (TINY_CLIP, "image_classification", False),
        (TINY_VIT, "image_classification", False),
        (TINY_BERT, "text_classification", False),
        (TINY_LLAMA, "causal_lm", False),
        (TINY_BERT, "text_classification", True),
        (TINY_CLIP, "image_classification", True),
    ],
    ids=["clip", "vit", "bert", "llama", "bert-lora", "clip-lora"],
)
def test_gradient_checkpointing_gives_the_same_gradients(tiny, task, lora):
    torch.manual_seed(0)
    model, cfg = _model(tiny, task, **{"method.name": "lora" if lora else "full", "method.lora.dropout": 0.0})
    if lora:
        model = wrap_lora(model, cfg, task)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero, which would hide a missing gradient of A
                torch.nn.init.normal_(p, std=0.1)
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed.get_base_model() if lora else checkpointed)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    grads = []
    for m in (model, checkpointed):
        m.train()
        m(**_inputs(tiny)).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    # Same gradients, and None exactly where the model never uses a parameter (CLIP's post_layernorm).
    assert {n for n, g in grads[1].items() if g is None} == {n for n, g in grads[0].items() if g is None}
    assert sum(g is not None for g in grads[1].values()) > len(grads[1]) // 2
    for name, g in grads[0].items():
        if g is not None:
            torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_runs_no_backward_through_frozen_blocks():
    model, cfg = _model(TINY_BERT, "text_classification", **{"method.name": "linear_probe"})
    enable_gradient_checkpointing(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    seen = []
    model.bert.encoder.register_forward_hook(lambda mod, inp, out: seen.append(out.last_hidden_state.requires_grad))
    model.train()
    model(**_inputs(TINY_BERT)).logits.sum().backward()
    assert seen == [False]
