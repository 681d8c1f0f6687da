"""Sentence-pair and regression tables built from SST-2 (../shared/data/sst2/train.tsv), deterministically, for
`fulltune compare` on tasks the shared data does not hold as such. Nothing is copied into the repository: the
tables go to --out.

- pairs/{train,val,test}.tsv (sentence1, sentence2, label): does phrase B come from review sentence A? SST-2's
  train rows are the phrases of its parsed sentences, so a sentence's phrases are rows too: label 1 pairs a
  sentence with one of its own phrases, label 0 with a phrase of another sentence; half of each, every sentence
  used once.
- regression/{train,val,test}.jsonl (text, label): four SST-2 phrases joined by " | "; the label is the share of
  them that are positive (0, 0.25, 0.5, 0.75 or 1), so the model must read each phrase's sentiment and count.

    python bench/pairs_regression_data.py --out /tmp/sst2_tasks [--shared ../shared/data] [--train 400 --eval 100]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_sst2(shared: Path, min_words: int, max_words: int) -> dict[int, list[str]]:
    """SST-2 train rows of min_words..max_words words, by label, in file order (duplicates dropped)."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen: set[str] = set()
    with open(shared / "sst2" / "train.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            text = row["sentence"].strip()
            if min_words <= len(text.split()) <= max_words and text not in seen:
                seen.add(text)
                by_label[int(row["label"])].append(text)
    return by_label


def sentence_phrases(shared: Path, min_words: int, max_words: int) -> list[tuple[str, list[str]]]:
    """SST-2 train rows of min_words..max_words words, each with the other rows that are its own phrases (spans of
    3 or more words, shorter than the sentence by 3 or more), in file order; sentences without one are left out."""
    with open(shared / "sst2" / "train.tsv", encoding="utf-8", newline="") as f:
        rows = [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    known = set(rows)
    out, seen = [], set()
    for text in rows:
        words = text.split()
        if not min_words <= len(words) <= max_words or text in seen:
            continue
        seen.add(text)
        spans = {
            " ".join(words[i:j])
            for i in range(len(words))
            for j in range(i + 3, min(len(words), i + len(words) - 2) + 1)
        }
        own = sorted(p for p in spans if p in known)
        if own:
            out.append((text, own))
    return out


def pair_rows(sentences: list[tuple[str, list[str]]], n: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """n pairs, half (sentence, one of its phrases) labelled 1, half (sentence, a phrase of the next sentence drawn)
    labelled 0; the sentences are popped (used once)."""
    rows = []
    for i in range(n):
        text, own = sentences.pop()
        if i % 2 == 0:
            rows.append((text, rng.choice(own), 1))
        else:
            other, phrases = sentences.pop()  # its phrases only: the other sentence itself is not shown
            foreign = [p for p in phrases if p not in text]
            rows.append((text, rng.choice(foreign or phrases), 0))
    rng.shuffle(rows)
    return rows


def regression_rows(by_label: dict[int, list[str]], n: int, rng: random.Random) -> list[tuple[str, float]]:
    """n texts of four phrases, k of them positive (k drawn uniformly from 0..4); the label is k / 4."""
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        phrases = [by_label[1].pop() for _ in range(k)] + [by_label[0].pop() for _ in range(4 - k)]
        rng.shuffle(phrases)
        rows.append((" | ".join(phrases), k / 4))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    ap.add_argument("--out", type=Path, required=True, help="where the two data folders go")
    ap.add_argument("--train", type=int, default=400, help="training rows per task")
    ap.add_argument("--eval", type=int, default=100, help="val and test rows per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = {"train": args.train, "val": args.eval, "test": args.eval}

    rng = random.Random(args.seed)
    sentences = sentence_phrases(args.shared, 12, 40)
    rng.shuffle(sentences)
    (args.out / "pairs").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        with open(args.out / "pairs" / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            w.writerow(["sentence1", "sentence2", "label"])
            w.writerows(pair_rows(sentences, n, rng))

    short = read_sst2(args.shared, 3, 8)  # phrases short enough that four fit in 96 tokens
    for texts in short.values():
        rng.shuffle(texts)
    (args.out / "regression").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        with open(args.out / "regression" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, label in regression_rows(short, n, rng):
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    print(f"wrote {args.out}/pairs and {args.out}/regression ({sizes})")


if __name__ == "__main__":
    main()
