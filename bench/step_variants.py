"""Where the next CPU speed-up of the `make bench` job lies: four ways to run the same training step, timed batch by
batch in one process on the same length-grouped SST-2 batches (MiniLM, batch 32, max length 64, AdamW lr 1e-4,
gradient clipping at 1.0), each way with its own copy of the model.

  autocast       fp32 weights, bf16 autocast, fused AdamW: what fulltune and Trainer's best flags do today
  bf16_master    bf16 weights and activations (no autocast casts), fp32 master weights in fused AdamW; the
                 clipping coefficient goes to the fused kernel as its grad_scale (no separate scaling pass)
  bf16_master_fast_dropout
                 the same with dropout masks drawn as int16 random bits (p quantised to 1/32768) instead of
                 bernoulli_, the step's costliest elementwise kernel on CPU
  no_dropout     bf16_master with dropout off: the bound on what dropout costs

The ways take turns on every batch; the sum over batches of each batch's fastest of `--repeats` epochs is
printed, so noise from other work on the machine falls out. A measurement, not a feature: the trainer does not
run the last three ways.

    .venv/bin/python bench/step_variants.py [--repeats 3] [--ways autocast,bf16_master,...]
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

import torch
from torch import nn

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
WAYS = ("autocast", "bf16_master", "bf16_master_fast_dropout", "no_dropout")


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        keep = torch.empty(x.shape, dtype=torch.int16).random_() >= threshold  # random_ on int16: [0, 2**15)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class Int16Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.threshold = p, round(p * 32768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _MaskedScale.apply(x, self.threshold, 1.0 / (1.0 - self.p))


def batches(tokenizer, rows: int = 2048, size: int = 32) -> list[tuple[torch.Tensor, ...]]:
    with open(SST2 / "train.tsv", encoding="utf-8") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    ids = tokenizer([r["sentence"] for r in table], truncation=True, max_length=64)["input_ids"]
    labels = torch.tensor([int(r["label"]) for r in table])
    order = list(range(len(table)))
    random.Random(0).shuffle(order)
    mega = [sorted(order[i : i + 50 * size], key=lambda j: -len(ids[j])) for i in range(0, len(order), 50 * size)]
    out = []
    for group in mega:
        for i in range(0, len(group), size):
            b = group[i : i + size]
            x = torch.zeros(len(b), max(len(ids[j]) for j in b), dtype=torch.long)
            mask = torch.zeros_like(x)
            for k, j in enumerate(b):
                x[k, : len(ids[j])], mask[k, : len(ids[j])] = torch.tensor(ids[j]), 1
            out.append((x, mask, labels[b]))
    return out


def make_step(way: str, path: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if way == "no_dropout" else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **off).train()
    if way == "bf16_master_fast_dropout":
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Dropout):
                    setattr(module, name, Int16Dropout(child.p))
    params = list(model.parameters())
    if way == "autocast":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=x, attention_mask=mask).logits
            loss = nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step
    master = [p.detach().float().clone() for p in params]
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(master, lr=1e-4, fused=True)

    def step(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> float:
        loss = nn.functional.cross_entropy(model(input_ids=x, attention_mask=mask).logits.float(), y)
        loss.backward()
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=torch.float32)))
        for m, g in zip(master, grads, strict=True):
            m.grad = g.float()
        opt.grad_scale = torch.clamp(norm, min=1.0)  # the fused kernel divides every gradient by it: clipping
        opt.step()
        for p, m in zip(params, master, strict=True):
            p.grad, m.grad = None, None
        torch._foreach_copy_([p.data for p in params], master)
        return loss.item()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ways", default=",".join(WAYS))
    args = ap.parse_args()
    if not SST2.is_dir():
        print(f"skipped: {SST2} is not present")
        return 0
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fulltune.model.bundle import packaged_minilm_path

    hf_logging.set_verbosity_error()
    path = str(packaged_minilm_path())
    data = batches(AutoTokenizer.from_pretrained(path))
    ways = args.ways.split(",")
    steps = {w: make_step(w, path) for w in ways}
    fastest = {w: [float("inf")] * len(data) for w in ways}
    losses: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(args.repeats):
        for i, batch in enumerate(data):
            for w in ways:
                start = time.perf_counter()
                losses[w].append(steps[w](*batch))
                fastest[w][i] = min(fastest[w][i], time.perf_counter() - start)
    base = sum(fastest[ways[0]])
    print(f"{torch.get_num_threads()} threads, {len(data)} batches, fastest of {args.repeats} per batch")
    for w in ways:
        total = sum(fastest[w])
        last = losses[w][-len(data) :]
        print(
            f"{w:<26} {total:6.2f} s  {base / total:5.2f}x {ways[0]}  "
            f"mean loss of the last epoch {sum(last) / len(last):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
