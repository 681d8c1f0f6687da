"""A LoRA run's export merges the adapters on the CPU tensor by tensor (`fulltune.model.lora.merged_state_dict`):
the same weights as peft's merge_and_unload on a copy, no copy of the model, the live adapters left as they train."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, config_kwargs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fulltune.config import load_config
from fulltune.model.build import build_model
from fulltune.model.bundle import ModelBundle
from fulltune.model.lora import merged_state_dict, wrap_lora
from fulltune.state.checkpoint import export_model


def _lora_model(tiny: dict, task: str):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.tiny_config": tiny, "model.dropout": 0.0, "method.name": "lora"})
    model = wrap_lora(build_model(cfg, task, None if task == "causal_lm" else ["neg", "pos"]).model, cfg, task)
    with torch.no_grad():  # B starts at zero: give the adapters (and a trained head copy) an update to merge
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "tiny,task,auto",
    [
        (config_kwargs(TINY_LLAMA, vocab_size=300) | {"model_type": "llama"}, "causal_lm", AutoModelForCausalLM),
        (TINY_BERT, "text_classification", AutoModelForSequenceClassification),
    ],
    ids=["llama", "bert-head"],
)
def test_merge_is_peft_merge_without_a_copy_and_leaves_the_adapters(tmp_path, monkeypatch, tiny, task, auto):
    model = _lora_model(tiny, task)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()

    deepcopy = copy.deepcopy

    def no_copy(obj, *args, **kwargs):
        assert not isinstance(obj, torch.nn.Module), "the merge deep-copied the model"
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    got = merged_state_dict(model)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # The live model is untouched: same tensors, adapters still separate (not merged into the base weights).
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # Extra memory: only the adapted weights are new tensors; every other one is the live tensor itself (on CPU).
    ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    new = [k for k, t in got.items() if t.data_ptr() not in ptrs]
    adapted = {n.rsplit(".base_layer", 1)[0] for n, _ in model.named_parameters() if ".base_layer.weight" in n}
    assert sorted(k.removesuffix(".weight") for k in new) == sorted(a.split("base_model.model.", 1)[1] for a in adapted)

    # The export path uses it: plain transformers loads the folder and gives the adapted model's outputs.
    export_model(model, ModelBundle(model=model, task=task), tmp_path, {"method": "lora"})
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] > 0
    assert not any("lora" in k for k in load_file(str(tmp_path / "model.safetensors")))
    plain = auto.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
