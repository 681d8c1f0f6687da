"""The embedded docstring data set: files, splits, determinism and plausible size."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fulltune.data import docstrings
from fulltune.data.docstrings import LABELS, SPLITS, build_docstring_dataset, collect_docstrings, split_of


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_docstring_dataset(tmp_path_factory.mktemp("docstrings"))


def test_writes_three_jsonl_files_with_every_label_in_train(built: dict[str, Path]) -> None:
    assert set(built) == set(SPLITS)
    for split, path in built.items():
        assert path.name == f"{split}.jsonl" and path.is_file()
        for row in _rows(path):
            assert set(row) == {"text", "label"}
            assert row["label"] in LABELS
            assert docstrings.MIN_CHARS <= len(row["text"]) <= docstrings.MAX_CHARS
    assert {row["label"] for row in _rows(built["train"])} == set(LABELS)
    assert len(LABELS) == 9


def test_no_text_in_two_splits_and_split_matches_hash(built: dict[str, Path]) -> None:
    seen: dict[str, str] = {}
    for split, path in built.items():
        for row in _rows(path):
            assert row["text"] not in seen, f"{row['text'][:60]!r} in {seen.get(row['text'])} and {split}"
            seen[row["text"]] = split
            assert split_of(row["text"]) == split


def test_counts_are_plausible_and_match_manifest(built: dict[str, Path]) -> None:
    per_split = {split: _rows(path) for split, path in built.items()}
    total = sum(len(rows) for rows in per_split.values())
    # ~2,900 on 3.11; loose enough for 3.10-3.13, whose docstrings and module lists differ somewhat.
    assert 2000 <= total <= 4000
    assert 0.74 <= len(per_split["train"]) / total <= 0.86
    for split in ("val", "test"):
        assert 0.06 <= len(per_split[split]) / total <= 0.14
    labels = Counter(row["label"] for rows in per_split.values() for row in rows)
    assert min(labels.values()) >= 80, labels

    manifest = json.loads((built["train"].parent / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["total"] == total
    assert manifest["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    for split, rows in per_split.items():
        expected = dict.fromkeys(LABELS, 0) | Counter(row["label"] for row in rows)
        assert manifest["counts"][split] == expected


def test_rebuild_reuses_identical_files_and_repairs_tampering(built: dict[str, Path]) -> None:
    out = built["train"].parent
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    stamps = {split: path.stat().st_mtime_ns for split, path in built.items()}

    again = build_docstring_dataset(out)
    assert again == built
    assert {split: path.stat().st_mtime_ns for split, path in again.items()} == stamps  # reused, not rewritten
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

    built["val"].write_text('{"text": "tampered", "label": "time"}\n', encoding="utf-8")
    build_docstring_dataset(out)
    assert built["val"].read_bytes() == before["val.jsonl"]


def test_fresh_process_builds_byte_identical_files(built: dict[str, Path], tmp_path: Path) -> None:
    # A different hash seed and a different set of already-imported modules must not change a byte.
    src = Path(docstrings.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(src)}
    code = "import sys; from fulltune.data.docstrings import build_docstring_dataset as b; b(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=120)
    for split, path in built.items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == path.read_bytes(), split
    assert (tmp_path / "manifest.json").read_bytes() == (built["train"].parent / "manifest.json").read_bytes()


def test_split_of_is_stable_and_whitespace_insensitive() -> None:
    # Pinned values: changing the hash would silently move texts between splits of cached data sets.
    assert [split_of(f"doc {i}") for i in range(12)] == [
        "train", "test", "train", "train", "train", "train", "val", "train", "test", "train", "train", "test",
    ]  # fmt: skip
    assert split_of("Open a file and return a stream.") == "val"
    assert split_of("Open a file\n    and return a stream.") == split_of("Open a file and return a stream.")


def test_collect_is_sorted_unique_and_single_labelled() -> None:
    rows = collect_docstrings()
    texts = [text for text, _ in rows]
    assert len(texts) == len(set(texts))
    assert rows == collect_docstrings()
    assert {label for _, label in rows} == set(LABELS)


def test_third_party_patches_of_stdlib_classes_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    def shout_once(self: logging.Logger, msg: str) -> None:
        """A method that a third-party package bolted onto logging.Logger; it must never become data."""

    monkeypatch.setattr(logging.Logger, "shout_once", shout_once, raising=False)
    assert all("bolted onto logging.Logger" not in text for text, _ in collect_docstrings())


def test_families_are_stdlib_only_and_disjoint() -> None:
    names = [name for family in docstrings.FAMILIES.values() for name in family]
    assert len(names) == len(set(names)), "a module in two families would drop all of its texts"
    assert all(name.split(".")[0] in sys.stdlib_module_names for name in names)
    assert not set(names) & docstrings.SKIP
