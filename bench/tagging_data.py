"""A named-entity-style tagging set built deterministically from AG News (shared/data/ag_news/train.csv), for a
learning check of `task: token_classification` with an uncased encoder (MiniLM):

- words: each news text split into words and punctuation marks;
- NAME: a run of capitalised words that does not start a sentence (Federal Trade Commission, Sanford Wallace);
- NUM: a run of words holding a digit (39, 2004, $1.5).

An uncased tokenizer never sees the capitals, so the model has to learn which words are names from what they are.
Writes train.conll, val.conll and test.conll (disjoint rows, in file order) to --out.

    python bench/tagging_data.py --out /tmp/ner --train 1000 --val 200 --test 200
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "train.csv"
WORD = re.compile(r"\w+(?:[-'.,]\w+)*|[^\w\s]")


def tag_words(words: list[str]) -> list[str]:
    """BIO tags of NAME and NUM runs, by the rule in the module docstring."""
    tags, previous, boundary = [], "O", True
    for word in words:
        kind = "NUM" if any(c.isdigit() for c in word) else "NAME" if word[:1].isupper() and not boundary else None
        tags.append("O" if kind is None else ("I-" if previous.endswith(kind) else "B-") + kind)
        previous, boundary = tags[-1], word in (".", "!", "?", ":", "-")
    return tags


def sentences(source: Path, max_words: int) -> list[list[str]]:
    with open(source, encoding="utf-8", newline="") as f:
        texts = [row["text"].replace("#39;", "'") for row in csv.DictReader(f)]
    return [words[:max_words] for t in texts if len(words := WORD.findall(t)) >= 5]


def write(path: Path, rows: list[list[str]]) -> None:
    lines = []
    for words in rows:
        lines += [f"{w} {t}" for w, t in zip(words, tag_words(words), strict=True)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--max_words", type=int, default=40)
    args = p.parse_args()
    rows = sentences(args.source, args.max_words)
    args.out.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, args.train), "val": (args.train, args.train + args.val)}
    bounds["test"] = (bounds["val"][1], bounds["val"][1] + args.test)
    for split, (a, b) in bounds.items():
        write(args.out / f"{split}.conll", rows[a:b])
        print(f"{split}: {len(rows[a:b])} sentences -> {args.out / f'{split}.conll'}")


if __name__ == "__main__":
    main()
