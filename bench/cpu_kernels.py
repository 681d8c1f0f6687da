"""What fulltune's CPU kernels buy, measured in one process: the bench job's model (all-MiniLM-L6-v2, batch 32,
bf16 autocast, fused AdamW) trained step by step in six copies (torch's SDPA or fulltune's CPU attention, three
q/k/v products or one, the last layer for every token or the first only), the copies taking turns in a shuffled
order on the same batches.

Separate processes on the shared development machines differ by 5-10% between runs; copies in one process that
take turns see the same machine, so their ratios hold to a percent or two.

    .venv/bin/python bench/cpu_kernels.py [--lengths 4,6,8,10,12,14,16,20] [--rounds 8]
"""

from __future__ import annotations

import argparse
import copy
import random
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4,6,8,10,12,14,16,20", help="tokens per example, one batch each per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    from fulltune.config import load_config
    from fulltune.model.bundle import packaged_minilm_path
    from fulltune.speed.plan import apply, plan
    from fulltune.training.optim import optimizer_step

    # The trainer's speed plan for this model on a CPU; each copy below leaves out what its variant compares.
    cfg = load_config(None, {"hardware.num_threads": args.threads})
    base = AutoModelForSequenceClassification.from_pretrained(str(packaged_minilm_path()), num_labels=2).train()
    full = plan(cfg, "cpu", "text_classification", base)
    process = ("num_threads", "cpu_allocator", "own_memory")  # once, for the copies' common source
    patches = ("cpu_dropout", "cpu_attention", "fused_qkv", "first_token_only")
    apply(base, full.leaving_out(*patches))
    variants = {}
    kinds = {"sdpa": (0, 0, 0), "attention": (1, 0, 0), "fused_qkv": (0, 1, 0), "first_token": (0, 0, 1)}
    kinds.update(both=(1, 1, 0), all=(1, 1, 1))
    for name, (attention, fused, first) in kinds.items():
        model = copy.deepcopy(base)
        off = [
            c for c, on in (("cpu_attention", attention), ("fused_qkv", fused), ("first_token_only", first)) if not on
        ]
        applied = apply(model, full.leaving_out(*process, *off)).plan
        assert all(applied.on(c) for c in patches if c not in off), applied
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))

    def step(model, optimizer, ids: torch.Tensor) -> float:
        mask = torch.ones_like(ids)
        mask[:4, -2:] = 0  # a little padding, as in a length-grouped batch
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(len(ids), dtype=torch.long)).loss
        loss.backward()
        optimizer_step(model, optimizer, None, 1.0)
        return time.perf_counter() - start

    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    batches = [torch.randint(1000, 2000, (32, n)) for n in lengths]
    for model, optimizer in variants.values():  # warm-up: every shape once
        for ids in batches:
            step(model, optimizer, ids)
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(args.rounds):
        for ids in batches:
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                seconds[name] += step(*variants[name], ids)
    steps = args.rounds * len(batches)
    print(f"{steps} steps each, lengths {lengths}, {args.threads} threads")
    print("| variant | ms/step | speed vs sdpa |")
    print("|---|---|---|")
    for name, total in seconds.items():
        print(f"| {name} | {1000 * total / steps:.1f} | {seconds['sdpa'] / total:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
