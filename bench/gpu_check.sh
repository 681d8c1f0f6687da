#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200: the `gpu`-marked tests, the ~1B-parameter Llama throughput
# bench (fulltune standard / compiled / lean against Trainer's best flags), then the headline: the configuration
# `fulltune plan` answers for full fine-tuning in 24 GB, run for a few steps at sequence length 2048 on an 8B- and a
# 1.24B-shaped Llama (bench/gpu_headline.py: peak max_memory_allocated and tokens/s), every figure in one JSON.
#
#   bash bench/gpu_check.sh [OUT_DIR]            on the GPU machine (python3 with CUDA torch, transformers, peft)
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]  the same code paths, tiny, on the CPU (or GPU_CHECK_DRY=1)
#
# It runs fulltune from this source tree (PYTHONPATH=src) and installs nothing from a registry: what the machine
# lacks (bitsandbytes, torchao, pytest) comes as wheels in bench/wheels (`make gpu-wheels` fetches them here; carry the
# folder along). Results: OUT_DIR (default $OUT, else outputs/gpu_check) gets gpu_check.json, tests.log, bench.log,
# headline.log.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_CHECK_DRY:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export GPU_CHECK_DRY=$DRY PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
began=$(date +%s)

if [ "$DRY" = 0 ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: error: no CUDA device (bash bench/gpu_check.sh --dry-run checks the CPU paths)" >&2; exit 2; }
    if compgen -G "bench/wheels/*.whl" >/dev/null; then
        # --no-index: local wheels only; --no-deps: never let pip replace the machine's CUDA torch
        "$PY" -m pip install --quiet --no-index --no-deps bench/wheels/*.whl 2>&1 | tail -3
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import pytest" 2>/dev/null || { echo "gpu_check: error: pytest is missing (make gpu-wheels puts it in bench/wheels)" >&2; exit 2; }
"$PY" - <<'PY'
import platform, torch, transformers
print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | "
      f"cuda {torch.version.cuda} | device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
PY

echo "== gpu tests =="
"$PY" -m pytest tests/e2e/test_gpu.py -m gpu -q -rs --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== throughput =="
bench_args=(--out "$OUT_DIR/throughput.json")
[ "$DRY" = 1 ] && bench_args+=(--dry-run)
"$PY" bench/gpu_throughput.py "${bench_args[@]}" 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== headline: full fine-tuning in 24 GB =="
headline_args=(--out "$OUT_DIR/headline.json")
[ "$DRY" = 1 ] && headline_args+=(--dry-run)
"$PY" bench/gpu_headline.py "${headline_args[@]}" 2>&1 | tee "$OUT_DIR/headline.log"
headline_rc=${PIPESTATUS[0]}

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$began" "$DRY" "$headline_rc" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, began, dry = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
headline_rc = int(sys.argv[6])
tests = {}
if (out / "tests.xml").is_file():
    for case in ET.parse(out / "tests.xml").getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped: " + (child.get("message") or "")
        tests[case.get("name")] = status
bench = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").is_file() else None
headline = json.loads((out / "headline.json").read_text()) if (out / "headline.json").is_file() else None
report = {"dry_run": dry, "tests_rc": tests_rc, "bench_rc": bench_rc, "headline_rc": headline_rc, "tests": tests,
          "throughput": bench, "headline": headline, "wall_s": int(time.time()) - began}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(f"wrote {out / 'gpu_check.json'} ({report['wall_s']} s; tests rc {tests_rc}, bench rc {bench_rc}, "
      f"headline rc {headline_rc})")
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$headline_rc" = 0 ]
