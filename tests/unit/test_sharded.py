"""Sharded training state (fulltune.state.sharded) in one process: save and load restore weights and AdamW state bit
for bit,
rows are read back across any split of the saved shards (what a resume on another world size does), and the
Hugging Face export consolidated from shards loads in plain transformers, split into several files when asked.
The 2-process FSDP runs are in test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.config import ConfigError
from fulltune.state.sharded import FORMAT, ShardReader, export_from_shards, load_sharded_state, save_sharded_state


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def trained(seed: int) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    model = tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, opt = trained(0)
    save_sharded_state(tmp_path, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index-rank0.json",
        "model-rank0.safetensors",
        "optim-rank0.safetensors",
    ]
    fresh = tiny_llama(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, fused=True)
    load_sharded_state(tmp_path, fresh, fresh_opt)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], fresh_opt.state[b][key]), (name, key)
    # and the next step is the same step
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def write_split(folder, tensors: dict[str, torch.Tensor], world: int) -> None:
    """Shards as `world` FSDP ranks write them: torch.chunk rows of dimension 0, one file set per rank."""
    for r in range(world):
        local, index = {}, {}
        for key, t in tensors.items():
            chunk = -(-t.shape[0] // world)
            start, stop = min(r * chunk, t.shape[0]), min((r + 1) * chunk, t.shape[0])
            if stop > start:
                local[key] = t[start:stop].clone()
                index[key] = {
                    "file": f"model-rank{r}.safetensors",
                    "shape": list(t.shape),
                    "dtype": "float32",
                    "start": start,
                    "stop": stop,
                }
        save_file(local, str(folder / f"model-rank{r}.safetensors"))
        (folder / f"index-rank{r}.json").write_text(
            json.dumps({"format": FORMAT, "world_size": world, "rank": r, "tensors": index})
        )


@pytest.mark.parametrize("saved_world", [2, 3])
def test_rows_read_back_across_any_split(tmp_path, saved_world):
    full = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    write_split(tmp_path, {"model/w": full}, saved_world)
    reader = ShardReader(tmp_path)
    assert reader.saved_world_size == saved_world
    assert torch.equal(reader.read_rows("model/w", None, None), full)
    for new_world in (1, 2, 4):  # the rows each rank of another world size owns
        chunk = -(-7 // new_world)
        for r in range(new_world):
            start, stop = min(r * chunk, 7), min((r + 1) * chunk, 7)
            if stop > start:
                assert torch.equal(reader.read_rows("model/w", start, stop), full[start:stop])


def test_missing_rank_files_are_an_error(tmp_path):
    write_split(tmp_path, {"model/w": torch.ones(4, 2)}, 2)
    (tmp_path / "index-rank1.json").unlink()
    with pytest.raises(ConfigError, match="index files of 2 ranks"):
        ShardReader(tmp_path)


def test_export_from_shards_loads_in_transformers(tmp_path):
    model, opt = trained(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_sharded_state(shards, model, opt)
    out = tmp_path / "export"
    out.mkdir()
    model.config.save_pretrained(str(out))
    export_from_shards(shards, out, max_file_bytes=64 * 1024)  # several files and an index
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    loaded = LlamaForCausalLM.from_pretrained(str(out))
    for (name, a), b in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b), name
