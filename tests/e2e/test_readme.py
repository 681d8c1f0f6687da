"""The README's commands work as written: every ```bash block is run, in order, in a fresh copy of the repository's
tracked files with `../shared` beside it, with `fulltune` on PATH. A block whose first line is the marker
`# long: not run by tests/e2e/test_readme.py` is left out (installation, the 10-minute demo); a block that uses
`../shared/data` is skipped when that folder is absent (FULLTUNE_SHARED names another folder to use as ../shared).
Every ```python block (the Python API, as a notebook cell) is run too, after them, by the same Python."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LONG = "# long: not run by tests/e2e/test_readme.py"


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = readme_blocks()
PYTHON_BLOCKS = re.findall(
    r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M
)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            dest = root / "fulltune" / name.decode()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    # ../shared beside the repository (FULLTUNE_SHARED points elsewhere, e.g. from a git worktree)
    shared = Path(os.environ.get("FULLTUNE_SHARED", REPO.parent / "shared"))
    if shared.is_dir():
        (root / "shared").symlink_to(shared)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "fulltune"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m fulltune "$@"\n')
    shim.chmod(0o755)
    return root


def test_readme_has_runnable_blocks():
    runnable = [b for b in BLOCKS if not b.startswith(LONG)]
    assert len(runnable) >= 6 and any(b.startswith(LONG) for b in BLOCKS)
    assert any("fulltune.train(" in b and "fulltune.predict(" in b for b in PYTHON_BLOCKS)
    commands = " ".join(runnable)
    for command in (
        "fulltune train",
        "fulltune evaluate",
        "fulltune predict",
        "fulltune compare",
        "fulltune plan",
        "fulltune prune",
        "fulltune config",
        "fulltune report",
    ):
        assert command in commands, command


def _env(clone: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        PATH=f"{clone / 'bin'}:{os.environ['PATH']}",
        PYTHONPATH=str(clone / "fulltune" / "src"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(clone, index):
    block = BLOCKS[index]
    if block.startswith(LONG):
        pytest.skip(block.splitlines()[0])
    if "../shared/data" in block and not (clone / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not present beside the clone")
    script = "set -euo pipefail\n" + block
    result = subprocess.run(
        ["bash", "-c", script], cwd=clone / "fulltune", env=_env(clone), capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, (
        f"README block {index} failed:\n{block}\n--- output ---\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    out = clone / "fulltune" / "outputs"
    if "--output_dir outputs/text\n" in block + "\n":
        assert (out / "text" / "report.html").is_file() and (out / "text" / "best" / "config.json").is_file()
    if "fulltune evaluate --checkpoint outputs/text/best" in block:
        assert (out / "text" / "eval" / "best-test" / "predictions.jsonl").is_file()
    if "fulltune compare" in block:
        assert (out / "compare" / "comparison.html").is_file()
    if "fulltune prune" in block:
        assert "perplexity" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(clone, index):
    """A Python block runs as a notebook cell would (after the shell blocks it follows, whose data it reads), and
    draws no progress bar."""
    work = clone / "fulltune"
    if not (work / "outputs" / "demo" / "data").is_dir():  # run alone: the data set of step 3
        subprocess.run(
            ["fulltune", "demo", "--data_only", "--output_dir", "outputs/demo"],
            cwd=work,
            env=_env(clone),
            check=True,
            capture_output=True,
        )
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=work,
        env=_env(clone),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"README Python block {index} failed:\n{result.stderr[-3000:]}"
    assert "it/s]" not in result.stderr and "s/it]" not in result.stderr
