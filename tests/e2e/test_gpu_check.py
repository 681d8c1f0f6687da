"""bench/gpu_check.sh stays ready for a GPU machine: its shell parses, and its CPU dry mode runs the GPU tests and
the throughput bench end to end and writes the JSON with every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


# In `make test` (about 25 s): marked slow, it once went unrun while two changes broke it (the gpu marker's skip and
# the one-run-per-folder rule).
def test_dry_mode_runs_every_path_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["tests_rc"] == 0 and report["bench_rc"] == 0
    tests = report["tests"]
    for name in (
        "test_bf16",
        "test_lean_fused_bf16_adamw",
        "test_one_process_data_parallel[ddp]",
        "test_one_process_data_parallel[fsdp]",
    ):
        assert tests[name] == "passed", (name, tests)
    assert tests["test_fp16_with_grad_scaler"].startswith("skipped")
    lines = report["throughput"]["lines"]
    assert set(lines) == {"fulltune", "fulltune_lean", "trainer_best"}
    for r in lines.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["steady_steps"] == 2
        assert r["mfu"] is None  # no GPU peak to divide by on a CPU
