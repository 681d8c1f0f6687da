"""fulltune and Trainer's best on a shared CPU: the job of bench/vs_hf_trainer.py (all-MiniLM-L6-v2 on SST-2 rows,
batch 32, max length 64, 1 epoch), quiet and beside 1 and 2 busy-loop processes (`python -c "while True: pass"`),
each run in its own process as vs_hf_trainer.py runs it, conditions and lines alternating, several repeats.

One table: each line's median training samples/s per condition and its ratio to its own quiet speed. Trainer's
best is the fair one for this CPU (trainer_best with bf16 units, trainer_best_fp32 where bf16 is emulated). The
environment is passed on as it is: an OMP_NUM_THREADS or OMP_WAIT_POLICY set here applies to every line.

    python bench/contention.py [--repeats 3] [--rows 512] [--busy 0,1,2] [--lines fulltune,trainer_best_fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "vs_hf_trainer.py"
sys.path.insert(0, str(BENCH.parent))

from vs_hf_trainer import SST2, cpu_kind  # noqa: E402  (the bench job and its CPU description)

BUSY_LOOP = "while True: pass"


def run_line(line: str, seed: int, rows: int, busy: int) -> float | None:
    """One run of `line` in its own process beside `busy` busy-loop processes; its training samples/s (None: failed)."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(BENCH), "--one", line, "--seed", str(seed), "--rows", str(rows)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if proc.returncode != 0:
        print(f"{line} beside {busy} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"])


def table(results: dict[tuple[str, int], list[float]], lines: list[str], busy: list[int]) -> str:
    """Markdown: a row per line, per condition its median samples/s and the ratio to the line's quiet median."""
    head = " | ".join(f"{'quiet' if b == 0 else f'beside {b} busy'} (x quiet)" for b in busy)
    out = [f"| line | {head} |", "|---|" + "---:|" * len(busy)]
    for line in lines:
        quiet = statistics.median(results[(line, 0)]) if results.get((line, 0)) else None
        cells = []
        for b in busy:
            runs = results.get((line, b))
            if not runs:
                cells.append("failed")
                continue
            med = statistics.median(runs)
            ratio = f" ({med / quiet:.2f}x)" if quiet else ""
            cells.append(f"{med:.1f}{ratio}")
        out.append(f"| {line} | {' | '.join(cells)} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--busy", default="0,1,2", help="busy-loop processes beside each run, one condition each")
    parser.add_argument("--lines", default=None, help="default: fulltune and Trainer's fair best for this CPU")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="also write every run's samples/s as JSON here")
    args = parser.parse_args()
    if not SST2.is_dir():
        print(f"skipped: {SST2} is not present")
        return 0
    from fulltune.runtime.device import cpu_has_fast_bf16

    lines = args.lines.split(",") if args.lines else ["fulltune", "trainer_best" if cpu_has_fast_bf16() else
                                                      "trainer_best_fp32"]  # fmt: skip
    busy = [int(b) for b in args.busy.split(",")]
    kind = cpu_kind()
    print(f"CPU: {kind}; load average at the start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for b in busy:  # conditions and lines alternate so that machine noise spreads over all of them
            for line in lines:
                sps = run_line(line, args.seed, args.rows, b)
                if sps is not None:
                    results.setdefault((line, b), []).append(sps)
                    print(f"  {line:<18} beside {b} busy, run {repeat + 1}: {sps:7.1f} samples/s", flush=True)
    print(f"\nCPU: {kind}; {args.rows} rows; median of {args.repeats}, samples/s (ratio to the line's quiet speed)")
    print(table(results, lines, busy))
    if args.out:
        data = {"cpu": kind, "runs": [{"line": k[0], "busy": k[1], "samples_per_s": v} for k, v in results.items()]}
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
