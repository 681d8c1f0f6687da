"""release_file_pages: a memory-mapped checkpoint's pages leave the resident set; nothing else is touched."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.filepages import release_file_pages

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
