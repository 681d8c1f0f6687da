"""Pruned exports: one shape in every layer gives a standard config that plain transformers loads (issue 13,
acceptance 4); per-layer widths keep fulltune's loader and say so."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fulltune.model.pruned import is_pruned_folder, load_pruned
from fulltune.model.pruning import PruneConfig, prune_model
from fulltune.prune.folder import save_pruned


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=300,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def test_uniform_prune_loads_in_plain_transformers(tmp_path):
    model = tiny_llama()
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude", prune_mlp=True))
    save_pruned(model, None, tmp_path / "pruned")
    assert not is_pruned_folder(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["head_dim"],
    ) == (4, 2, 64, 8)
    assert "standard transformers config" in (tmp_path / "pruned" / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # nothing of fulltune's
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        again = load_pruned(tmp_path / "pruned")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(again, want, atol=1e-5, rtol=0)


def test_uneven_prune_keeps_fulltunes_loader_and_says_so(tmp_path):
    model = tiny_llama()
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude", prune_mlp=True, layer_start=1))
    save_pruned(model, None, tmp_path / "pruned")
    assert is_pruned_folder(tmp_path / "pruned")
    assert "layers have different widths" in (tmp_path / "pruned" / "README.md").read_text()
    with pytest.raises(Exception, match="size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(
            load_pruned(tmp_path / "pruned")(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_every_uniform_ratio_loads_in_plain_transformers(tmp_path, ratio):
    # 8 query heads over 4 KV groups: 25% leaves 6 heads and 75% leaves 2, so 6 does not divide hidden_size 64,
    # which LlamaConfig refuses (its modules would take head_dim from the config): written as Mistral's config then.
    model = tiny_llama()
    prune_model(model, PruneConfig(pruning_ratio=ratio, importance="magnitude", prune_mlp=True))
    save_pruned(model, None, tmp_path / "pruned")
    assert not is_pruned_folder(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    kv = 4 - round(4 * ratio)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2 * kv, kv, 8)
    assert config["model_type"] == ("llama" if 64 % (2 * kv) == 0 else "mistral")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # nothing of fulltune's
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
        out = plain.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))
    readme = (tmp_path / "pruned" / "README.md").read_text()
    assert "standard transformers config" in readme
    assert ("MistralForCausalLM" in readme) == (config["model_type"] == "mistral")


def test_bf16_prune_reads_and_writes_bf16(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    prune_model(model, PruneConfig(pruning_ratio=0.5, importance="magnitude", prune_mlp=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_pruned(model, None, tmp_path / "pruned")
    assert {p.dtype for p in load_pruned(tmp_path / "pruned").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_pruned(tmp_path / "pruned", torch_dtype="float32").parameters()} == {torch.float32}
