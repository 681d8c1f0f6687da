"""What `fulltune prune` needs to run the pruned-Llama recovery guide's commands as typed: calibration, recovery
and evaluation text that ships with fulltune when no --data_file / --eval_file is given, and the guide's output
layout (a log holding the perplexity lines the guide greps for, the pruned model, the recovered model).

The built-in text is English prose built offline from the docstrings of Python's standard library (the corpus
`fulltune demo` trains on, fulltune.data.docstrings): its train split calibrates and trains, its test split is held
out for perplexity. It is small (about 40k + 16k tokens with a Llama-3 tokenizer) and says so in the log: a real
recovery wants the user's own --data_file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fulltune.data.docstrings import build_docstring_dataset
from fulltune.files.rundir import atomic_dir

BUILTIN_TRAIN_CHARS = 160_000
"""Characters of the docstring train split used for calibration and recovery training (~40k tokens)."""
BUILTIN_EVAL_CHARS = 70_000
"""Characters of the docstring test split used for perplexity (the whole split, ~16k tokens)."""
LOG_NAME = Path("logs") / "training.log"

# The lines the guide greps for (`grep "剪枝后 PPL" logs/training.log`): written into that log only, with an English
# gloss; the terminal gets the English line alone.
PPL_LABELS = {"original": "原始模型 PPL", "pruned": "剪枝后 PPL", "recovered": "微调后 PPL"}


def _texts(path: Path, limit: int) -> str:
    """Docstrings of a split (JSONL), one blank line apart, up to `limit` characters (whole texts only)."""
    parts: list[str] = []
    size = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        if size + len(text) > limit and parts:
            break
        parts.append(text)
        size += len(text) + 2
    return "\n\n".join(parts) + "\n"


def builtin_text(out_dir: Path) -> tuple[Path, Path, str]:
    """(training/calibration text file, evaluation text file, a line saying what they are), written under out_dir."""

    root = out_dir / "builtin_text"
    splits = build_docstring_dataset(root / "docstrings")
    train, held_out = root / "train.txt", root / "eval.txt"
    train.write_text(_texts(splits["train"], BUILTIN_TRAIN_CHARS), encoding="utf-8")
    held_out.write_text(_texts(splits["test"], BUILTIN_EVAL_CHARS), encoding="utf-8")
    what = (
        f"built-in English text (docstrings of Python's standard library, built offline): {train} "
        f"({train.stat().st_size:,} bytes, train split) and {held_out} ({held_out.stat().st_size:,} bytes, "
        "test split); --data_file / --eval_file override them"
    )
    return train, held_out, what


class GuideLog:
    """OUTPUT/logs/training.log: every line `fulltune prune` prints, and the perplexity lines in the guide's words
    (which the terminal gets in English)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def line(self, text: str, terminal: str | None = None) -> None:
        """`text` into the log; `terminal` (default: the same text) on the terminal."""
        print(text if terminal is None else terminal, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def perplexity(self, which: str, value: float, tokens: int) -> None:
        english = f"{which} perplexity {value:.4f} over {tokens:,} tokens"
        self.line(f"{PPL_LABELS[which]}: {value:.4f} ({english})", terminal=english)

    def close(self) -> None:
        self.file.close()


def publish_recovered(recovered: Path, out_dir: Path) -> Path:
    """OUTPUT/recovered: the recovered model's exported files (hard links where the file system allows them)."""
    target = out_dir / "recovered"

    def link(src: str, dst: str) -> Any:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_dir(target) as tmp:  # an earlier recovered model stays whole until the new one is in place
        copy_ignore = shutil.ignore_patterns("training_state")
        shutil.copytree(recovered, tmp, copy_function=link, ignore=copy_ignore, dirs_exist_ok=True)
    return target
