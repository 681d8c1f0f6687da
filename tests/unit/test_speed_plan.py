"""The speed plan (`speed.plan`): each choice and its reason on a CPU with and without bf16 units, on CUDA (a device
value: nothing runs there) and on the memory planner's meta device; each `speed.*` switch; the model's parts that
decide where a patch applies; applying (the plan as it came out; the model's patches in any order give the same
model, bit for bit); the run header's lines; the old config keys and values as aliases; the heap trimmer."""

from __future__ import annotations

import copy
import itertools
import os
import sys

import pytest
import torch
import yaml
from conftest import TINY_BERT, base_overrides
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from fulltune.config import ConfigError, config_from_dict, load_config, to_dict
from fulltune.model.prepare import prepare_model
from fulltune.planning.estimate import dtypes_for
from fulltune.runtime.device import resolve_precision
from fulltune.speed import allocator, threads
from fulltune.speed.cpu_dropout import ATTENTION, CPUDropout, swap_dropout, use_cpu_attention
from fulltune.speed.first_token import first_token_layer
from fulltune.speed.plan import ALLOCATOR_ENV, ALLOCATOR_KEPT, CHOICES, NOT_CPU, apply, describe, plan, set_threads
from fulltune.speed.qkv import QKVLinear, fuse_qkv

SIZES = dict(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
TASK = "text_classification"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file mappings and glibc: Linux")


def _cfg(tmp_path, **extra: object):
    return load_config(None, base_overrides(tmp_path / "run", TINY_BERT, **extra))


def _bert(**config: object) -> nn.Module:
    return BertForSequenceClassification(BertConfig(**SIZES, num_labels=3, **config))


@pytest.fixture(autouse=True)
def one_thread_from_the_environment(monkeypatch):
    """The thread count set as `make test` sets it (OMP_NUM_THREADS=1): the automatic thread policy, which measures
    the machine, has its own tests (test_threads.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def glibc_as_is(monkeypatch):
    """The allocator choice as on a glibc machine with no MALLOC_* variables (whatever this one has)."""
    monkeypatch.setattr(allocator, "glibc", lambda: object())
    for key in allocator.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)


def _pair(choice) -> tuple[bool, str]:
    return choice.applied, choice.reason


def _reasons(speed) -> dict[str, tuple[bool, str]]:
    return {c.name: _pair(c) for c in speed.choices}


ON_A_CPU = {
    "num_threads": (False, "OMP_NUM_THREADS=1 in the environment"),
    "cpu_allocator": (True, ALLOCATOR_KEPT),
    "cpu_dropout": (True, "training on a CPU: dropout masks drawn four elements per 64-bit random number"),
    "cpu_attention": (True, "training on a CPU with SDPA: attention dropout with the CPU masks, bf16 products"),
    "fused_qkv": (True, "training on a CPU: each attention's q, k and v projections as one matrix product"),
    "first_token_only": (True, "a BERT-family sequence classifier: its head reads the first token only"),
    "own_memory": (True, "training on a CPU: the weights that train are copied out of the weight file's mapping"),
}


@linux_only
@pytest.mark.parametrize("bf16_units", [True, False])
def test_every_choice_and_its_reason_on_a_cpu(tmp_path, monkeypatch, glibc_as_is, bf16_units: bool) -> None:
    """With or without bf16 units the CPU gets the same choices (the precision differs: bf16 autocast or fp32), and
    the memory planner's estimate reads the same plan."""
    monkeypatch.setattr("fulltune.runtime.device.cpu_has_fast_bf16", lambda: bf16_units)
    monkeypatch.setattr(sys.modules["fulltune.planning.estimate"], "cpu_has_fast_bf16", lambda: bf16_units)
    cfg = _cfg(tmp_path, hardware__mixed_precision="auto")
    assert resolve_precision("auto", torch.device("cpu")).name == ("bf16" if bf16_units else "fp32")
    speed = plan(cfg, torch.device("cpu"), TASK, _bert())
    assert [c.name for c in speed.choices] == list(CHOICES)
    assert _reasons(speed) == ON_A_CPU
    estimated = dtypes_for(cfg, "cpu", TASK)
    assert estimated.casts == bf16_units and estimated.cpu_attention and estimated.fused_qkv
    assert describe(speed) == (
        "CPU threads: OMP_NUM_THREADS=1 in the environment\n"
        "speed: CPU dropout masks, fulltune's CPU attention, q/k/v as one product, last layer for the first token "
        f"only, weights that train copied out of the file mapping\nCPU allocator: {ALLOCATOR_KEPT}\n"
    )


def test_on_cuda_only_the_device_independent_choices_apply(tmp_path, glibc_as_is) -> None:
    """torch.device('cuda') is a value here: the plan never asks the device, and applying it touches only the model
    (so it runs on a machine without a GPU)."""
    cfg = _cfg(tmp_path, hardware__num_threads=2)
    model = _bert()
    speed = plan(cfg, torch.device("cuda"), TASK, model)
    assert speed.device == "cuda" and speed.threads == 2
    expected = {name: (False, NOT_CPU) for name in CHOICES}
    expected |= {"num_threads": (True, "hardware.num_threads=2"), "first_token_only": ON_A_CPU["first_token_only"]}
    assert _reasons(speed) == expected
    assert dtypes_for(cfg, "cuda", TASK).cpu_attention is False
    applied = apply(model, speed.leaving_out("num_threads"))  # (this process's thread count stays)
    assert not applied.trim_heap.active
    kinds = {type(m) for m in model.modules()}
    assert CPUDropout not in kinds and QKVLinear not in kinds and model.config._attn_implementation == "sdpa"
    assert type(model.bert.encoder.layer[-1]).__name__.startswith("FirstToken")
    assert describe(applied.plan) == "speed: last layer for the first token only\n"


def test_the_thread_count_is_the_plans_where_nobody_set_one(tmp_path, monkeypatch) -> None:
    """No OMP_NUM_THREADS, no hardware.num_threads: the plan counts the CPUs free of other work (here a made-up
    two-CPU machine with one busy), applying sets it and hands the trainer a watch that follows the machine, the run
    header says it; `fulltune evaluate` decides the same way; speed.threads: off leaves torch's own count."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "machine", lambda: threads.Machine(2, busy=1.0))
    before = torch.get_num_threads()
    try:
        speed = plan(_cfg(tmp_path), "cpu", TASK)
        assert (speed.threads, speed.follows, speed.machine) == (1, True, threads.Machine(2, busy=1.0))
        applied = apply(_bert(), speed.leaving_out("cpu_allocator", "own_memory"))
        assert torch.get_num_threads() == 1 and applied.watch_threads.active
        header = "CPU threads: 1 (2 CPUs, 1.0 busy with other work; re-checked between steps)\n"
        assert describe(applied.plan).startswith(header)
        torch.set_num_threads(2)
        assert set_threads(_cfg(tmp_path), "cpu").applied and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    off = plan(_cfg(tmp_path, speed__threads="off"), "cpu", TASK)
    assert off.threads is None and _pair(off["num_threads"]) == (False, "speed.threads: off")
    assert "speed, turned off: speed.threads" in describe(off)


def test_the_planners_meta_device_runs_nothing(tmp_path) -> None:
    speed = plan(_cfg(tmp_path, hardware__num_threads=2), "meta", TASK, _bert())
    assert speed["num_threads"].reason == "the meta device runs nothing" and speed.threads is None
    assert [c.name for c in speed.choices if c.applied] == ["first_token_only"]


@linux_only
@pytest.mark.parametrize("switch", ["cpu_dropout", "fused_qkv", "cpu_allocator", "first_token_only", "own_memory"])
def test_each_switch_turns_its_choice_off(tmp_path, glibc_as_is, switch: str) -> None:
    speed = plan(_cfg(tmp_path, **{f"speed__{switch}": "off"}), "cpu", TASK, _bert())
    turned = [switch] + (["cpu_attention"] if switch == "cpu_dropout" else [])  # one switch, both parts
    assert _reasons(speed) == ON_A_CPU | {name: (False, f"speed.{switch}: off") for name in turned}
    assert describe(speed).endswith(f"speed, turned off: speed.{switch}\n")


@pytest.mark.parametrize(
    "name,extra,task,build,reason",
    [
        ("cpu_dropout", {}, TASK, lambda: _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
         "the model has no dropout layer with p > 0"),
        ("cpu_attention", {}, TASK, lambda: _bert(attn_implementation="eager"), "the model is not on SDPA attention"),
        ("fused_qkv", {"training__compile": True}, TASK, _bert,
         "training.compile: torch.compile takes the projections as they are"),
        ("fused_qkv", {}, TASK, lambda: nn.Sequential(nn.Linear(4, 4)),
         "no q/k/v triple of plain linear layers reading one input"),
        ("first_token_only", {}, "causal_lm", _bert,
         "task causal_lm: only a text classifier's head reads the first token alone"),
        ("first_token_only", {"training__memory": "lean"}, TASK, _bert,
         "training.memory: lean keeps the full last layer"),
        ("first_token_only", {}, TASK, lambda: LlamaForSequenceClassification(LlamaConfig(**SIZES, num_labels=3)),
         "not a BERT-family sequence classifier (its head reads other positions)"),
    ],
)  # fmt: skip
def test_what_the_model_and_the_config_decide(tmp_path, name, extra, task, build, reason) -> None:
    assert _pair(plan(_cfg(tmp_path, **extra), "cpu", task, build())[name]) == (False, reason)
    assert plan(_cfg(tmp_path), "cpu", TASK, _bert())[name].applied  # the same choice where nothing says no


@linux_only
def test_the_allocator_choice_leaves_the_users_malloc_settings_alone(tmp_path, monkeypatch, glibc_as_is) -> None:
    cfg = _cfg(tmp_path)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    speed = plan(cfg, "cpu", TASK, _bert())
    assert _pair(speed["cpu_allocator"]) == (False, ALLOCATOR_ENV)
    assert f"CPU allocator: {ALLOCATOR_ENV}\n" in describe(speed)  # said, as the user's setting
    monkeypatch.setattr(allocator, "glibc", lambda: None)  # musl, or another C library
    assert _pair(plan(cfg, "cpu", TASK, _bert())["cpu_allocator"]) == (False, "not glibc: its allocator as it is")


# ---------------------------------------------------------------------------------------------------- applying


PATCHES = {
    "cpu_dropout": swap_dropout,
    "cpu_attention": use_cpu_attention,
    "fused_qkv": fuse_qkv,
    "first_token_only": first_token_layer,
}


def _step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients of one training-mode step (dropout on, seeded)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.manual_seed(1)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1, 2]))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("order", list(itertools.permutations(PATCHES)), ids="-".join)
def test_the_model_patches_in_any_order_make_the_same_model(tmp_path, order) -> None:
    """`apply`'s order and any other give the same modules, the same attention and, bit for bit, the same logits
    and gradients: no patch reads what another one did (the first-token layer computes its fused projections on
    their own)."""
    torch.manual_seed(0)
    source = _bert().train()
    planned, permuted = copy.deepcopy(source), copy.deepcopy(source)
    speed = plan(_cfg(tmp_path), "cpu", TASK, planned)
    applied = apply(planned, speed.leaving_out("num_threads", "cpu_allocator", "own_memory")).plan
    assert all(applied.on(name) for name in PATCHES)
    for name in order:
        PATCHES[name](permuted)
    assert [(n, type(m)) for n, m in planned.named_modules()] == [(n, type(m)) for n, m in permuted.named_modules()]
    assert planned.config._attn_implementation == permuted.config._attn_implementation == ATTENTION
    (logits, grads), (logits2, grads2) = _step(planned), _step(permuted)
    assert torch.equal(logits, logits2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[n], grads2[n]) for n in grads)


def test_applying_records_what_it_found(tmp_path) -> None:
    """A patch that found nothing to change is recorded as not applied, with why: a tiny model built from its
    config lies in no file mapping; a model that takes no custom attention keeps SDPA."""
    model = _bert()
    speed = plan(_cfg(tmp_path), "cpu", TASK, model).leaving_out("num_threads", "cpu_allocator")
    out = apply(model, speed).plan
    assert _pair(out["own_memory"]) == (False, "no weight that trains lies in a file mapping")
    assert [c.name for c in out.choices if c.applied] == ["cpu_dropout", "cpu_attention", "fused_qkv",
                                                          "first_token_only"]  # fmt: skip
    with_attention = _bert()
    with_attention.set_attn_implementation = lambda name: (_ for _ in ()).throw(ValueError("no custom attention"))
    kept = apply(with_attention, speed.leaving_out("own_memory")).plan
    assert _pair(kept["cpu_attention"]) == (False, "the model takes no custom attention: SDPA kept")


@linux_only
def test_weights_in_a_file_mapping_are_moved_and_said(tmp_path) -> None:
    _bert().save_pretrained(tmp_path / "model")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "model")
    speed = plan(_cfg(tmp_path), "cpu", TASK, model, trains={"classifier.weight", "bert.pooler.dense.weight"})
    out = apply(model, speed.leaving_out("num_threads", "cpu_allocator")).plan["own_memory"]
    assert out.applied and out.reason.endswith("of weights that train copied out of the weight file's mapping")


def test_model_preparation_keeps_the_applied_plan(tmp_path) -> None:
    bundle, model, _ = prepare_model(_cfg(tmp_path, speed__fused_qkv="off"), TASK, ["a", "b"], torch.device("cpu"))
    speed = bundle.speed.plan
    assert not speed.on("fused_qkv") and not any(isinstance(m, QKVLinear) for m in model.modules())
    assert speed.on("cpu_dropout") and any(isinstance(m, CPUDropout) for m in model.modules())
    assert "speed, turned off: speed.fused_qkv\n" in describe(speed)


# ---------------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "old,value,key,expected",
    [
        ("hardware.cpu_dropout", "torch", "cpu_dropout", "off"),
        ("hardware.cpu_dropout", "auto", "cpu_dropout", "auto"),
        ("hardware.fused_qkv", "off", "fused_qkv", "off"),
        ("hardware.cpu_allocator", "system", "cpu_allocator", "off"),
        ("hardware.cpu_allocator", "auto", "cpu_allocator", "auto"),
        ("training.first_token_only", "off", "first_token_only", "off"),
    ],
)
def test_old_keys_and_values_are_aliases(tmp_path, old: str, value: str, key: str, expected: str) -> None:
    """As an override (dotted, or `key=value` text), in a YAML file, and in a config.yaml an earlier version saved
    (a checkpoint's); the new key takes the old value too."""
    section, leaf = old.split(".")
    assert getattr(load_config(None, {old: value}).speed, key) == expected
    assert getattr(load_config(None, [f"{old}={value}"]).speed, key) == expected
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: {leaf: value}}))
    assert getattr(load_config(path).speed, key) == expected
    saved = to_dict(load_config(None))
    del saved["speed"]
    saved[section][leaf] = value
    assert getattr(config_from_dict(saved).speed, key) == expected
    assert getattr(load_config(None, {f"speed.{key}": value}).speed, key) == expected
    assert "speed" in to_dict(load_config(None, {old: value})) and leaf not in to_dict(load_config(None))[section]


def test_the_speed_section_takes_auto_or_off(tmp_path) -> None:
    """Unquoted, YAML 1.1 reads off as false (and on as true): a switch takes them as off (and auto)."""
    path = tmp_path / "config.yaml"
    path.write_text("speed:\n  own_memory: off\n  fused_qkv: on\nhardware:\n  cpu_dropout: off\n")
    assert (load_config(path).speed.own_memory, load_config(path).speed.fused_qkv) == ("off", "auto")
    assert load_config(path).speed.cpu_dropout == "off"
    assert (
        load_config(None, ["speed.first_token_only=off", "training.first_token_only=off"]).speed.first_token_only
        == "off"
    )
    cfg = load_config(None, {"hardware.cpu_dropout": "torch"})
    assert _pair(plan(cfg, "cpu", TASK, _bert())["cpu_dropout"]) == (False, "speed.cpu_dropout: off")
    with pytest.raises(ConfigError, match=r"speed\.own_memory.*'auto', 'off'"):
        load_config(None, {"speed.own_memory": "sometimes"})


# ---------------------------------------------------------------------------------------------------- heap trim


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_heap_trim_that_was_not_set_up_does_nothing() -> None:
    trim = allocator.HeapTrim(None)
    assert not trim.active and not trim(allocator.HEAP_TRIM_EVERY)


@linux_only
def test_heap_trim_hands_free_pages_back() -> None:
    """With fulltune's allocator settings freed blocks stay resident; the trimmer on its step interval gives their
    pages back (what keeps long runs' resident set from creeping up), does nothing between intervals, and nothing
    until the resident set has grown again. Its state is its own: a second trimmer starts afresh."""
    if allocator.glibc() is None:
        pytest.skip("glibc only")
    trim = allocator.keep_freed_memory()
    assert trim.active and trim.trimmed_rss == 0
    blocks = [torch.ones(2**20) for _ in range(64)]  # 64 blocks of 4 MiB, then every other one freed: holes
    keep = blocks[1::2]
    del blocks
    before = _rss()
    assert not trim(allocator.HEAP_TRIM_EVERY + 1)  # not on the interval: nothing
    assert _rss() > before - 16 * 2**20
    assert trim(allocator.HEAP_TRIM_EVERY)
    assert _rss() < before - 100 * 2**20, (before, _rss())
    assert all(float(b[7]) == 1.0 for b in keep)  # what is still in use is untouched
    more = [torch.ones(2**20) for _ in range(8)]  # 32 MiB more: well under HEAP_GROWTH
    del more
    low = _rss()
    assert not trim(2 * allocator.HEAP_TRIM_EVERY)
    assert _rss() > low - 16 * 2**20
    assert allocator.keep_freed_memory().trimmed_rss == 0 and trim.trimmed_rss > 0
