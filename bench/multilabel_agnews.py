"""A multi-label data set built from AG News (../shared/data/ag_news/train.csv), the same every time: the rows in a
seeded shuffle (random.Random(0)) are taken two by two, each pair's texts joined with a space, and its labels are
the set of both rows' classes (one label when the two agree: about a quarter of the pairs). Writes train.jsonl,
val.jsonl and test.jsonl of 480, 100 and 200 pairs (no pair in two splits).

    python bench/multilabel_agnews.py OUT_DIR
    fulltune compare --data_dir OUT_DIR --model minilm --methods full data.max_length=64 data.batch_size=16 \\
        training.num_epochs=2 training.base_learning_rate=2e-4 eval.tune_thresholds=true
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

SIZES = {"train": 480, "val": 100, "test": 200}
AG_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "train.csv"


def build(source: Path, out: Path, sizes: dict[str, int] = SIZES) -> None:
    with open(source, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    pairs = [(rows[2 * i], rows[2 * i + 1]) for i in range(len(rows) // 2)]
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in sizes.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for a, b in pairs[start : start + n]:
                row = {"text": f"{a['text']} {b['text']}", "label": sorted({a["label"], b["label"]})}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        start += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--source", type=Path, default=AG_NEWS, help="AG News train.csv (text,label)")
    args = p.parse_args()
    build(args.source, args.out_dir)


if __name__ == "__main__":
    main()
