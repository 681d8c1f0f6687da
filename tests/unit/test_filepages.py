"""release_file_pages: a memory-mapped checkpoint's pages leave the resident set; nothing else is touched. own_memory:
weights that train leave the mapping, with the same values; frozen ones stay mapped."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.speed.filepages import _file_ranges, _in_ranges, own_memory, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def _resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_anonymous_memory_is_left_alone() -> None:
    t = torch.arange(4 << 20, dtype=torch.float32)
    assert release_file_pages(t) == 0
    assert torch.equal(t, torch.arange(4 << 20, dtype=torch.float32))


def test_mapped_weights_leave_the_resident_set_and_read_back_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=8, vocab_size=256
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto")  # as `fulltune prune` loads it
    weight = model.model.layers[0].mlp.up_proj.weight.detach()  # 4 MiB of the mapped file
    expected = weight.clone()
    neighbour = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    weight.float().sum()  # read: its pages become resident
    before = _resident_kib()
    released = release_file_pages(weight)
    assert released >= (4 << 20) - 2 * 4096, released  # all but the two partial pages at its ends
    assert before - _resident_kib() >= 3 << 10  # >= 3 MiB left the resident set
    assert torch.equal(weight, expected)  # read again from the file
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, neighbour)


def _mapped(t: torch.Tensor) -> bool:
    begin = t.data_ptr()
    return _in_ranges(begin, begin + t.numel() * t.element_size(), _file_ranges())


def test_weights_that_train_get_memory_of_their_own(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    params = dict(model.named_parameters())
    trains = {n for n in params if ".layers.1." in n}
    frozen = "model.layers.0.mlp.up_proj.weight"
    expected = {n: p.detach().clone() for n, p in params.items()}
    assert _mapped(params[frozen]) and all(_mapped(params[n]) for n in trains)
    moved = own_memory(model, trains)
    assert moved == sum(params[n].numel() * 4 for n in trains)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # the same Parameters
    assert not any(_mapped(after[n]) for n in trains) and _mapped(after[frozen])
    assert all(torch.equal(after[n], expected[n]) for n in params)
    with torch.no_grad():
        after["model.layers.1.mlp.up_proj.weight"].add_(1.0)  # written in place: the file is not
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.layers[1].mlp.up_proj.weight, expected["model.layers.1.mlp.up_proj.weight"])
    assert own_memory(model, trains) == 0  # nothing left to move
