"""Peak memory per trainable parameter: standard full fine-tuning (fp32 weights, torch AdamW(fused=True), normal
backward) against lean mode (bf16 weights, BF16AdamW, optimizer step fused into backward, gradient checkpointing)
on a parameter-dominated job: a ~110M-parameter Llama with batch 2 x 16 tokens, so activations are negligible.
"lean" compiles its update as the trainer does (from 20M parameters), "lean-eager" does not, two cheaper BF16AdamW
settings run too, and "lean-8bit" / "lean-4bit" keep torchao's block-quantized moments (LowBitAdamW, whose compiled
update is built for each chunk shape before the baseline; see MODES); every mode trains the same steps from the same
weights. `--shape llama-1.24b` is Llama-3.2-1B's shape (tied embeddings, 8 KV heads); the summary lines give the
low-bit modes' peak against 4.3 / 3.3 bytes/param and their s/step against lean's.

Each mode runs in a fresh subprocess; its peak is `ru_maxrss` at the end minus `ru_maxrss` once torch and
transformers are imported and a tiny model of the same kind has trained two steps (so lazily loaded code and the
compiled update's build are not counted), divided by the trainable parameter count. glibc is told to serve every
allocation over 64 KiB with mmap, so freed tensors go back to the OS and RSS follows live bytes, not allocator
leftovers. The "held" column counts bytes exactly (weights + gradients + optimizer state) right after the last
backward. s/step runs one thread, and every fresh mmap-served buffer page-faults; compare modes by the ratio to
standard within one invocation (`--repeats N` alternates the modes N times and prints medians).
`--glibc-default-malloc --threads 2` times the modes as the trainer runs (the bytes/param columns then mean nothing).

    .venv/bin/python bench/lean_memory.py            # ~3-5 minutes on 2 busy CPU cores
    .venv/bin/python bench/lean_memory.py --steps 4 --layers 4 --modes standard,lean,lean-eager --repeats 3
    .venv/bin/python bench/lean_memory.py --shape llama-1.24b --steps 1 --n-batches 1 --batch 1 --modes lean-8bit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# mode -> (BF16AdamW state_dtype, rounding, training.lean_compiled_step, description). "lean" is what
# `training.memory: lean` does by default; like the trainer, "auto" compiles the update from 20M parameters.
MODES = {
    "standard": (None, None, None, "fp32 weights, torch AdamW(fused=True), normal backward"),
    "lean": (
        "bf16",
        "stochastic",
        "auto",
        "bf16 weights, BF16AdamW (bf16 moments, stochastic rounding), fused step, checkpointing, the update "
        "compiled from 20M parameters: the trainer's default lean mode (6 bytes/param held)",
    ),
    "lean-eager": ("bf16", "stochastic", "off", "lean with the eager update (training.lean_compiled_step: off)"),
    "lean-bf16-kahan": ("bf16", "kahan", "auto", "lean with Kahan compensation instead of stochastic rounding (8 B)"),
    "lean-mixed-kahan": ("mixed", "kahan", "auto", "lean with exp_avg_sq fp32 and Kahan compensation (10 bytes)"),
    "lean-8bit": (
        "adamw8bit",
        "stochastic",
        "auto",
        "lean with torchao's 8-bit moments (training.lean_optimizer: adamw8bit; 4.03 bytes/param held)",
    ),
    "lean-4bit": ("adamw4bit", "stochastic", "auto", "lean with 4-bit moments (adamw4bit; 3.13 bytes/param held)"),
}
# the modes whose first field names a low-bit lean optimizer (LowBitAdamW) instead of a BF16AdamW state dtype
LOWBIT_BITS = {"adamw8bit": 8, "adamw4bit": 4}


# --shape presets: Llama-3.2-1B's shape (1.24B parameters, 8 KV heads, tied embeddings), and the default 110M one
SHAPES = {
    "llama-1.24b": dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, kv_heads=8, tie=True),
    "llama-110m": dict(vocab=16000, hidden=768, intermediate=2048, layers=12, kv_heads=None, tie=False),
}


def llama_config(
    vocab: int, hidden: int, intermediate: int, layers: int, kv_heads: int | None = None, tie: bool = False
) -> Any:
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        use_cache=False,
    )


def build(mode: str, cfg: Any, lr: float, n_params: int | None = None) -> tuple[Any, Any, Any]:
    """The model, optimizer and (lean) fused-step handle of one mode, with deterministic initial weights.

    n_params: the parameter count that decides whether the update is compiled (default: this model's)."""
    import torch
    from transformers import LlamaForCausalLM

    from fulltune.model.prepare import enable_gradient_checkpointing
    from fulltune.training.lean import BF16AdamW, wants_compiled_step
    from fulltune.training.lean_fused import attach_fused_step
    from fulltune.training.lowbit import LowBitAdamW

    lean = mode.startswith("lean")
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16 if lean else torch.float32)
    with torch.no_grad():  # the same initial values in both modes (bf16 = fp32 rounded), made chunk by chunk
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(1000 + i)
            for chunk in p.view(-1).split(1 << 20):
                chunk.copy_(torch.randn(chunk.shape, generator=gen).mul_(0.02))
    model.train()
    if not lean:
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True), None
    enable_gradient_checkpointing(model)  # as the trainer does in lean mode
    state_dtype, rounding, compiled_step, _ = MODES[mode]
    n_params = n_params or sum(p.numel() for p in model.parameters())
    compiled = wants_compiled_step(compiled_step, n_params)
    if state_dtype in LOWBIT_BITS:
        opt = LowBitAdamW(
            model.parameters(), lr=lr, weight_decay=0.01, bits=LOWBIT_BITS[state_dtype], compiled=compiled
        )
    else:
        opt = BF16AdamW(
            model.parameters(), lr=lr, weight_decay=0.01, state_dtype=state_dtype, rounding=rounding, compiled=compiled
        )
    return model, opt, attach_fused_step(model, opt)


def warm_lowbit_chunks(mode: str, cfg: Any) -> None:
    """Build the compiled low-bit update for every chunk shape the model will hand it (one graph per shape), on
    small 1-D stand-ins, so neither the build nor its memory counts in the measurement."""
    import torch
    from transformers import LlamaForCausalLM

    from fulltune.training.lowbit import MIN_QUANTIZED, LowBitAdamW

    state_dtype = MODES[mode][0]
    probe = LowBitAdamW([torch.zeros(1)], bits=LOWBIT_BITS[state_dtype])
    with torch.device("meta"):
        sizes = {p.numel() for p in LlamaForCausalLM(cfg).parameters()}
    stand_ins = set()  # (chunk length, whether its tensor's moments are quantized)
    for n in sizes:
        quantized = n >= MIN_QUANTIZED and n % probe.block_size == 0
        for start in range(0, n, probe.chunk_size):
            stand_ins.add((min(n, start + probe.chunk_size) - start, quantized))
    for length, quantized in sorted(stand_ins):
        # a quantized chunk comes from a tensor of 4096+ elements; a plain one stays a stand-in of its own length
        p = torch.zeros(max(length, MIN_QUANTIZED) if quantized else length, dtype=torch.bfloat16)
        opt = LowBitAdamW(
            [p], bits=LOWBIT_BITS[state_dtype], compiled=True, chunk_size=length if quantized else probe.chunk_size
        )
        p.grad = torch.ones_like(p)
        opt.step()


def train(
    model: Any, opt: Any, handle: Any, batches: list, steps: int, on_last_backward: Callable[[], None] | None = None
) -> list[float]:
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # lean: every parameter is updated inside this call
        losses.append(loss.item())
        if on_last_backward is not None and step == steps - 1:
            on_last_backward()
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses


def held_bytes(model: Any, opt: Any) -> int:
    """Exact bytes of weights + gradients + optimizer state tensors alive now."""
    import torch

    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    # a quantized moment (torchao's OptimState8bit / 4bit) is its codes, scales and code book
    tensors += [t for v in states for t in ([v.codes, v.scale, v.qmap] if hasattr(v, "codes") else [v])]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from fulltune.runtime.memory import maxrss_bytes
    from fulltune.training.lean import wants_compiled_step

    torch.set_num_threads(args.threads)
    cfg = llama_config(args.vocab, args.hidden, args.intermediate, args.layers, args.kv_heads or None, args.tie)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    # warm up on a tiny model of the same kind (lazy imports, kernels, thread pools, the compiled update if the big
    # model gets one) before reading the baseline
    lowbit = MODES[args.mode][0] in LOWBIT_BITS
    # (a low-bit update is compiled per chunk shape: the tiny model's would be wasted builds, warm_lowbit_chunks
    # builds the big model's)
    tiny = build(args.mode, llama_config(64, 64, 64, 1), lr=1e-4, n_params=1 if lowbit else n_params)
    train(*tiny, [torch.randint(0, 64, (1, 4))], steps=2)
    del tiny
    if lowbit and wants_compiled_step(MODES[args.mode][2], n_params):
        warm_lowbit_chunks(args.mode, cfg)
    g = torch.Generator().manual_seed(0)
    # a few fixed batches, cycled: the model can memorise them, so the loss moves and the comparison means something
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.n_batches)]
    baseline = maxrss_bytes()

    model, opt, handle = build(args.mode, cfg, args.lr)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = []  # standard: grads + state present after backward; lean: grads already consumed
    start = time.perf_counter()
    losses = train(model, opt, handle, batches, args.steps, lambda: held.append(held_bytes(model, opt)))
    step_s = (time.perf_counter() - start) / args.steps
    peak = maxrss_bytes()
    with torch.no_grad():
        final = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    if handle is not None:
        assert handle.step_count == args.steps and not handle.nonfinite()
    return {
        "mode": args.mode,
        "compiled": bool(getattr(opt, "compiled", False)),
        "params": n_params,
        "baseline": baseline,
        "peak": peak,
        "held": held[0],
        "losses": losses,
        "final_loss": final,
        "step_s": step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default: as many as query heads)")
    ap.add_argument("--tie", action="store_true", help="tie the input and output embeddings")
    ap.add_argument("--shape", choices=list(SHAPES), help="a preset for vocab, hidden, intermediate, layers, ...")
    ap.add_argument("--lr", type=float, default=1e-4)
    # one thread by default: on a shared 2-core box, two OpenMP threads fighting other jobs made elementwise
    # ops 100x slower; memory, the point here, does not depend on it
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the modes (alternating); medians are shown")
    ap.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="speed only: leave glibc's allocator as the trainer runs it (RSS then keeps allocator leftovers, so "
        "the bytes/param columns no longer measure live memory)",
    )
    ap.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for key, value in SHAPES[args.shape].items() if args.shape else ():
        setattr(args, key, 0 if value is None else value)

    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not args.glibc_default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    keys = ("steps", "n_batches", "batch", "seq", "vocab", "hidden", "intermediate", "layers", "kv_heads", "lr")
    passthrough = [x for k in (*keys, "threads") for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    passthrough += ["--tie"] if args.tie else []
    rounds: list[dict[str, dict]] = []
    for i in range(args.repeats):
        rounds.append({})
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, "--worker", mode, *passthrough],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            rounds[-1][mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"# round {i + 1}, {mode}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    report(rounds, args)


def report(rounds: list[dict[str, dict]], args: argparse.Namespace) -> None:
    """Medians over the rounds; a mode's time ratio is taken against standard's time in the same round."""
    from statistics import median

    from vs_hf_trainer import cpu_kind

    def bpp(r: dict) -> float:
        return (r["peak"] - r["baseline"]) / r["params"]

    first = rounds[0]
    n = next(iter(first.values()))["params"]
    malloc = "glibc default malloc (bytes/param not comparable)" if args.glibc_default_malloc else "mmap > 64 KiB"
    print(
        f"\nCPU: {cpu_kind()}; {args.threads} thread(s), {malloc}; {len(rounds)} round(s), modes alternating\n"
        f"{n / 1e6:.1f}M trainable parameters, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
        f"lr {args.lr}\n"
    )
    print(
        "| mode | peak RSS delta, bytes/param | held after backward, bytes/param | loss step 1 | "
        f"loss step {args.steps} | eval loss after | s/step | s/step / standard's |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in first.items():
        runs = [rd[mode] for rd in rounds]
        ratio = "-"
        if "standard" in first:
            ratio = f"{median(rd[mode]['step_s'] / rd['standard']['step_s'] for rd in rounds):.2f}"
        name = f"{mode} (compiled update)" if r.get("compiled") else mode
        print(
            f"| {name} | {median(bpp(x) for x in runs):.2f} | {r['held'] / r['params']:.2f} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {r['final_loss']:.4f} | "
            f"{median(x['step_s'] for x in runs):.2f} | {ratio} |"
        )
    print()
    for mode in ("lean-8bit", "lean-4bit"):
        if mode in first and "lean" in first:
            ratio = median(rd[mode]["step_s"] / rd["lean"]["step_s"] for rd in rounds)
            target = 4.3 if mode == "lean-8bit" else 3.3
            print(
                f"- {mode}: peak {median(bpp(rd[mode]) for rd in rounds):.2f} bytes/param (target <= {target}); "
                f"s/step {ratio:.2f}x lean's (target <= 1.3)"
            )
    if "standard" not in first:
        return
    std = first["standard"]
    for mode, r in first.items():
        if mode == "standard":
            continue
        rel = r["final_loss"] / std["final_loss"] - 1
        mem = median(bpp(rd[mode]) / bpp(rd["standard"]) for rd in rounds)
        print(
            f"- {mode}: {mem:.2f}x standard's peak bytes/param (target <= 0.5); eval loss "
            f"{rel:+.2%} vs standard (target within 2%)"
        )


if __name__ == "__main__":
    main()
