"""Structured pruning of tiny random Llama / Qwen2 / Mistral decoders: GQA layout, counts, save/load, options."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_LLAMA_GQA, config_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fulltune.model.pruned import is_pruned_folder, load_pruned
from fulltune.model.pruning import (
    PruneConfig,
    allocate_layer_ratios,
    get_layer_shapes,
    parameter_count,
    prune_model,
)
from fulltune.prune.folder import save_pruned

TINY = config_kwargs(TINY_LLAMA_GQA)
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = (
    TINY[k]
    for k in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
)
HEAD_DIM = HIDDEN // HEADS
GROUP = HEADS // KV_HEADS


def make(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls, cfg_cls = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "mistral": (MistralForCausalLM, MistralConfig),
    }[arch]
    return cls(cfg_cls(**{**TINY, **overrides})).eval()


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(7))


def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def expected_params(shapes, qkv_bias: bool, tied: bool) -> int:
    """Hand count for a Llama-family decoder with per-layer (q heads, kv heads, intermediate)."""
    total = VOCAB * HIDDEN * (1 if tied else 2) + HIDDEN  # embeddings (+ lm_head) + final norm
    for n_q, n_kv, inter in shapes:
        total += HIDDEN * n_q * HEAD_DIM * 2 + HIDDEN * n_kv * HEAD_DIM * 2  # q, o ; k, v
        total += (n_q + 2 * n_kv) * HEAD_DIM if qkv_bias else 0
        total += 3 * HIDDEN * inter + 2 * HIDDEN  # gate, up, down ; two RMSNorms
    return total


def shape_tuples(model):
    return [
        (s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]) for s in get_layer_shapes(model)
    ]


@pytest.mark.parametrize(
    "arch,qkv_bias,tied",
    [("llama", False, False), ("qwen2", True, True), ("mistral", False, False)],
)
def test_half_pruning_layout_forward_generate_and_count(arch, qkv_bias, tied):
    model = make(arch, tie_word_embeddings=tied)
    assert parameter_count(model) == expected_params([(HEADS, KV_HEADS, INTER)] * LAYERS, qkv_bias, tied)
    report = prune_model(model, PruneConfig(pruning_ratio=0.5, importance="taylor"), calib())

    pruned = [(HEADS // 2, KV_HEADS // 2, INTER // 2)] * LAYERS
    assert shape_tuples(model) == pruned
    for layer in model.model.layers:
        attn = layer.self_attn
        n_q = attn.q_proj.out_features // HEAD_DIM
        n_kv = attn.k_proj.out_features // HEAD_DIM
        assert n_q == n_kv * GROUP and attn.num_key_value_groups == GROUP
        assert attn.o_proj.in_features == attn.q_proj.out_features
        assert attn.v_proj.out_features == attn.k_proj.out_features
        if qkv_bias:
            assert attn.q_proj.bias.shape == (n_q * HEAD_DIM,) and attn.k_proj.bias.shape == (n_kv * HEAD_DIM,)
    assert report["params_before"] == expected_params([(HEADS, KV_HEADS, INTER)] * LAYERS, qkv_bias, tied)
    assert report["params_after"] == parameter_count(model) == expected_params(pruned, qkv_bias, tied)
    assert [
        (r["num_attention_heads"], r["num_key_value_heads"], r["intermediate_size"]) for r in report["layers"]
    ] == pruned

    x = inputs()
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 9, VOCAB) and torch.isfinite(logits).all()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    # cached decoding (fewer kv heads per layer in the cache) agrees with a full forward on the result
    with torch.no_grad():
        full = model(out[:, :-1]).logits[:, -1].argmax(-1)
    assert torch.equal(full, out[:, -1])


def test_eager_attention_after_pruning():
    model = make("llama", attn_implementation="eager")
    x = inputs()
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude"))
    with torch.no_grad():
        eager = model(x).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(x).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_removing_dead_groups_and_channels_is_exact():
    # zero one KV group (its q/k/v rows and o columns) and half the MLP channels in every layer: they contribute
    # nothing, magnitude ranks them last, so pruning them must leave the logits unchanged
    model = make("qwen2")
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.q_proj.weight[: GROUP * HEAD_DIM] = 0
            a.q_proj.bias[: GROUP * HEAD_DIM] = 0
            for lin in (a.k_proj, a.v_proj):
                lin.weight[:HEAD_DIM] = 0
                lin.bias[:HEAD_DIM] = 0
            a.o_proj.weight[:, : GROUP * HEAD_DIM] = 0
            m.gate_proj.weight[1::2] = 0
            m.up_proj.weight[1::2] = 0
            m.down_proj.weight[:, 1::2] = 0
        x = inputs()
        before = model(x).logits
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude"))
    assert shape_tuples(model) == [(HEADS // 2, KV_HEADS // 2, INTER // 2)] * LAYERS
    # the surviving kv head is the original head 1 and the surviving channels the even ones
    ref = make("qwen2")
    torch.testing.assert_close(
        model.model.layers[0].self_attn.k_proj.weight, ref.model.layers[0].self_attn.k_proj.weight[HEAD_DIM:]
    )
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight[0::2])
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_identical(tmp_path, arch):
    model = make(arch, tie_word_embeddings=arch == "qwen2")
    report = prune_model(model, PruneConfig(pruning_ratio=0.5, layer_ratios="importance"), calib())
    x = inputs()
    with torch.no_grad():
        logits = model(x).logits
    out = save_pruned(model, None, tmp_path / "pruned", report=report)
    assert is_pruned_folder(out) and not is_pruned_folder(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fulltune_layer_shapes"] == get_layer_shapes(model)
    assert json.loads((out / "fulltune_prune_report.json").read_text())["params_after"] == report["params_after"]

    loaded = load_pruned(out)
    assert type(loaded) is type(model)
    assert shape_tuples(loaded) == shape_tuples(model)
    assert parameter_count(loaded) == parameter_count(model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)
    gen_kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(x, **gen_kw), model.generate(x, **gen_kw))

    half = load_pruned(out, torch_dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(x).logits).all()


def test_plain_folder_is_not_pruned(tmp_path):
    model = make("llama")
    model.save_pretrained(tmp_path)
    assert not is_pruned_folder(tmp_path)
    # a standard folder (unpruned, or pruned to one shape in every layer) loads as plain transformers loads it
    assert shape_tuples(load_pruned(tmp_path)) == shape_tuples(model)


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_ratio_zero_is_identity(importance):
    model = make("llama")
    x = inputs()
    with torch.no_grad():
        before = model(x).logits
    n_before = parameter_count(model)
    flags = [p.requires_grad for p in model.parameters()]
    report = prune_model(model, PruneConfig(pruning_ratio=0.0, importance=importance), calib())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert parameter_count(model) == n_before == report["params_after"] == report["params_before"]
    assert [p.requires_grad for p in model.parameters()] == flags


def test_layer_range_keeps_outside_layers_full():
    model = make("llama")
    report = prune_model(model, PruneConfig(pruning_ratio=0.5, layer_start=1, layer_end=3), calib())
    full, half = (HEADS, KV_HEADS, INTER), (HEADS // 2, KV_HEADS // 2, INTER // 2)
    assert shape_tuples(model) == [full, half, half, full]
    assert [r["pruned"] for r in report["layers"]] == [False, True, True, False]
    assert report["params_after"] == expected_params([full, half, half, full], False, False)


def test_attention_only_and_mlp_only():
    model = make("llama")
    prune_model(model, PruneConfig(pruning_ratio=0.5, prune_mlp=False, importance="magnitude"))
    assert shape_tuples(model) == [(HEADS // 2, KV_HEADS // 2, INTER)] * LAYERS
    model = make("llama")
    prune_model(model, PruneConfig(pruning_ratio=0.25, prune_attention=False, importance="magnitude"))
    assert shape_tuples(model) == [(HEADS, KV_HEADS, INTER - 32)] * LAYERS


def test_taylor_and_magnitude_both_work_and_taylor_leaves_no_grads():
    mag, tay = make("llama"), make("llama")
    prune_model(mag, PruneConfig(pruning_ratio=0.5, importance="magnitude"))
    # a 1-D calibration stream is cut into blocks
    prune_model(tay, PruneConfig(pruning_ratio=0.5, importance="taylor", calibration_block_size=32), calib().flatten())
    assert shape_tuples(mag) == shape_tuples(tay)
    assert all(p.grad is None for p in tay.parameters())
    # different criteria keep different channels on a random model
    assert not torch.equal(mag.model.layers[0].mlp.up_proj.weight, tay.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError):
        prune_model(make("llama"), PruneConfig(pruning_ratio=0.5, importance="taylor"), None)


def test_importance_layer_ratios_differ_but_keep_the_average():
    model = make("llama")
    report = prune_model(model, PruneConfig(pruning_ratio=0.5, layer_ratios="importance"), calib())
    mlp_ratios = [r["mlp_ratio"] for r in report["layers"]]
    assert len(set(round(r, 6) for r in mlp_ratios)) > 1
    assert sum(mlp_ratios) / LAYERS == pytest.approx(0.5, abs=1e-9)
    sizes = [s[2] for s in shape_tuples(model)]
    assert len(set(sizes)) > 1
    assert sum(sizes) == pytest.approx(LAYERS * INTER / 2, abs=LAYERS)  # rounding per layer only
    # attention: with 2 kv groups each layer must keep one, so every layer is at the 0.5 cap; layout stays valid
    for n_q, n_kv, _ in shape_tuples(model):
        assert n_kv >= 1 and n_q == n_kv * GROUP


def test_allocate_layer_ratios_clips_and_rebalances():
    scores = [1.0, 1.0, 1.0, 10.0]
    ratios = allocate_layer_ratios(scores, 0.5, [0.6] * 4, "importance", 1.0)
    assert all(0.0 <= r <= 0.6 + 1e-12 for r in ratios)
    assert sum(ratios) / 4 == pytest.approx(0.5)
    assert ratios[3] < ratios[0]  # the important layer loses less
    assert allocate_layer_ratios(scores, 0.3, [0.6] * 4, "uniform", 1.0) == [0.3] * 4


def test_bad_config():
    with pytest.raises(ValueError):
        PruneConfig(pruning_ratio=1.0)
    with pytest.raises(ValueError):
        PruneConfig(importance="random")
    with pytest.raises(ValueError):
        PruneConfig(layer_ratios="owl")


def test_load_pruned_takes_an_edited_config(tmp_path):
    from transformers import AutoConfig

    model = make("llama")
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude"))
    out = save_pruned(model, None, tmp_path / "pruned")
    config = AutoConfig.from_pretrained(out)
    config.attention_dropout, config.use_cache = 0.25, False  # what fulltune's build_model sets before loading
    loaded = load_pruned(out, config=config)
    assert loaded.config.attention_dropout == 0.25 and loaded.config.use_cache is False
    assert loaded.model.layers[0].self_attn.attention_dropout == 0.25
    assert shape_tuples(loaded) == shape_tuples(model)
