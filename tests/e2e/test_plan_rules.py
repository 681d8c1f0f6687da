"""`fulltune plan` recommends by the seeds' rules (002's decision tree): data size, memory, performance need,
and says which rule fired (issue 13)."""

from __future__ import annotations

from pathlib import Path

from test_plan import family_config

from fulltune import planning as plan
from fulltune.model.trainable import METHODS
from fulltune.planning.recommend import _qlora_estimate


def _results(tmp_path: Path, family: str = "llama"):
    cfg, task, labels = family_config(tmp_path, family, "full")
    results = {}
    for method in METHODS:
        facts = plan.inspect_model(plan.with_method(cfg, method), task, labels)
        results[method] = plan.estimate(plan.with_method(cfg, method), task, facts, "cpu"), facts
    return cfg, task, results


def test_data_size_rules(tmp_path):
    cfg, task, results = _results(tmp_path)
    roomy = int(4 * results["full"][0].peak)
    small = plan.recommend(cfg, task, results, roomy, 500, "cpu")
    assert small.method == "lora" and "rule data" in small.reasons[0] and "under 1k" in small.reasons[0]
    mid = plan.recommend(cfg, task, results, roomy, 5_000, "cpu")  # the seeds: LoRA recommended below 10k
    assert mid.method == "lora" and "1k-10k" in mid.reasons[0]
    big = plan.recommend(cfg, task, results, roomy, 50_000, "cpu")
    assert big.method == "full" and "over 10k" in big.reasons[0]
    assert any("QLoRA left out" in r for r in big.reasons)  # on CPU


def test_performance_rule(tmp_path):
    cfg, task, results = _results(tmp_path)
    roomy = int(4 * results["full"][0].peak)
    best = plan.recommend(cfg, task, results, roomy, 5_000, "cpu", performance="best")
    assert best.method == "full" and best.reasons[0].startswith("rule performance")
    enough = plan.recommend(cfg, task, results, roomy, 50_000, "cpu", performance="enough")
    assert enough.method == "lora" and "good enough" in enough.reasons[0]


def test_memory_rule_picks_qlora_on_cuda_when_lora_does_not_fit(tmp_path):
    cfg, task, results = _results(tmp_path)
    lora = results["lora"][0]
    qlora = _qlora_estimate(lora)
    assert qlora.weights < lora.weights
    # A budget between QLoRA's and LoRA's smallest peaks (micro-batch 1, checkpointing): only QLoRA fits.
    lora_min = plan.estimate(plan.with_method(cfg, "lora", 1, 16, True), task, results["lora"][1], "cuda").peak
    budget = int((lora_min - 0.5 * (lora.weights - qlora.weights)) / plan.FIT_FRACTION)
    rec = plan.recommend(cfg, task, {k: v for k, v in results.items() if k in ("lora",)}, budget, 500, "cuda")
    assert rec.method == "qlora", rec.reasons
    assert any("rule memory" in r and "QLoRA" in r for r in rec.reasons)


def test_the_dry_runs_figures_overrule_the_data_rule(tmp_path):
    from dataclasses import replace

    cfg, task, results = _results(tmp_path)
    roomy = int(4 * results["full"][0].peak)
    full, lora = results["full"][0], results["lora"][0]

    def measured(lora_bytes: float, lora_seconds: float) -> dict:
        return results | {
            "full": (replace(full, measured=100e6, step_seconds=1.0), results["full"][1]),
            "lora": (replace(lora, measured=lora_bytes, step_seconds=lora_seconds), results["lora"][1]),
        }

    # LoRA measured no lighter and slower than full: the data rules' LoRA gives way to full, and the reason says why
    for n in (500, 5_000):
        rec = plan.recommend(cfg, task, measured(100e6, 1.3), roomy, n, "cpu")
        assert rec.method == "full", rec.reasons
        assert "dry run measured LoRA no lighter" in rec.reasons[0] and "1.30 vs 1.00 s/step" in rec.reasons[0]
    # LoRA lighter, or faster, or not measured: the rule stands; an explicit --performance choice stands too
    assert plan.recommend(cfg, task, measured(60e6, 1.3), roomy, 500, "cpu").method == "lora"
    assert plan.recommend(cfg, task, measured(100e6, 0.7), roomy, 500, "cpu").method == "lora"
    assert plan.recommend(cfg, task, results, roomy, 500, "cpu").method == "lora"
    assert plan.recommend(cfg, task, measured(100e6, 1.3), roomy, 500, "cpu", performance="enough").method == "lora"


def test_plan_says_what_lean_mode_and_a_bf16_base_change(tmp_path):
    from dataclasses import replace

    cfg, task, results = _results(tmp_path)
    report = plan.plan(cfg, 10 * 2**30, ("full", "lora"), calibrate=False)
    full, lora = (m for m in report["methods"] if m["method"] in ("full", "lora"))
    notes = report["precision_notes"]
    lean = next(n for n in notes if n.startswith("full:"))
    assert "training.memory=lean" in lean and "whatever model.torch_dtype loads" in lean
    bf16 = next(n for n in notes if n.startswith("lora:"))
    assert "model.torch_dtype=bfloat16" in bf16
    # The figures: lean mode's bf16 weights and moments estimate below standard mode; a LoRA base loaded in bf16
    # holds its frozen weights in 2 bytes (the adapters stay fp32).
    lean_cfg = plan.with_method(replace(cfg, training=replace(cfg.training, memory="lean")), "full")
    lean_peak = plan.estimate(lean_cfg, task, plan.inspect_model(lean_cfg, task, None), "cpu").peak
    assert lean_peak < full["peak"]
    bf16_cfg = plan.with_method(replace(cfg, model=replace(cfg.model, torch_dtype="bfloat16")), "lora")
    facts = plan.inspect_model(bf16_cfg, task, None)
    assert facts.weight_bytes < lora["weights"]
    assert facts.weight_bytes - 2 * (facts.total - facts.trainable) - 4 * facts.trainable < 2**16  # + buffers
