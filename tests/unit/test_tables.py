"""Tables are read by a real CSV parser: adversarial texts round-trip exactly in CSV, TSV and JSONL; JSON label
values follow one rule; GLUE-style unquoted TSVs with stray quotes still read literally; prepare-images keeps every
file and never leaks one into two splits."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from conftest import write_images

from fulltune.config import DataConfig
from fulltune.data.images import prepare_images
from fulltune.data.text import DataError, label_vocabulary, read_examples
from fulltune.files.rundir import OUTPUT_RECORD

ADVERSARIAL = [
    "a tab\there and\tthere",
    'quotes "inside" and a lone " quote',
    "a newline\ninside, and a CRLF\r\nas well",
    "line separator \u2028 and next line \u0085 and paragraph \u2029",
    "form feed \f vertical tab \v file separator \x1c",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "RTL: שלום עולם and العربية with \u200f marks \u202e reversed",
    "  leading and trailing spaces  ",
    "comma, semicolon; pipe | backslash \\ end",
    "zero width \u200b joiner \u200d and BOM \ufeff inside",
    '"starts with a quote" and goes on',
    "ends with a tab\t",
]
LABELS = [str(i % 3) for i in range(len(ADVERSARIAL))]


def _write(path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text(
            "".join(
                json.dumps({"text": t, "label": lb}, ensure_ascii=False) + "\n"
                for t, lb in zip(ADVERSARIAL, LABELS, strict=True)
            ),
            encoding="utf-8",
        )
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(["text", "label"])
        writer.writerows(zip(ADVERSARIAL, LABELS, strict=True))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_adversarial_texts_round_trip_exactly(tmp_path, fmt):
    path = tmp_path / f"train.{fmt}"
    _write(path, fmt)
    examples = read_examples(path, DataConfig())
    assert examples.texts == ADVERSARIAL
    assert examples.labels == LABELS
    assert examples.lines[0] == (1 if fmt == "jsonl" else 2)


def test_row_and_line_numbers_follow_the_file(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text('text,label\n"two\nlines",0\nok,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 4\): empty label"):
        read_examples(path, DataConfig())


def test_glue_style_tsv_with_stray_quotes_reads_literally(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nthe "best" film\t1\n"quoted" start then more\t0\n', encoding="utf-8")
    examples = read_examples(path, DataConfig(text_column="sentence"))
    assert examples.texts == ['the "best" film', '"quoted" start then more']


def test_tab_inside_an_unquoted_tsv_text_is_an_error_not_a_class(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na fine\tfilm\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): 3 fields, but the header has 2"):
        read_examples(path, DataConfig(text_column="sentence"))


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_field_over_the_csv_modules_limit_reads_whole(tmp_path, fmt):
    """A 300 KiB text (a long document) in one field: the csv module's own limit is 128 KiB."""
    long = "word, " * 50_000
    path = tmp_path / f"train.{fmt}"
    sep = "," if fmt == "csv" else "\t"
    path.write_text(f"text{sep}label\nshort{sep}0\n" + (f'"{long}"' if fmt == "csv" else long) + f"{sep}1\n")
    examples = read_examples(path, DataConfig())
    assert examples.texts == ["short", long] and examples.labels == ["0", "1"]


def test_a_broken_csv_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\nok,0\nfine,1\n"never closed,1\n')
    with pytest.raises(DataError, match=r"train.csv': not a valid CSV file \(record from line 4: "):
        read_examples(path, DataConfig())


def test_other_encodings(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ncafé crème,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="byte offset 14.*data.encoding"):
        read_examples(path, DataConfig())
    assert read_examples(path, DataConfig(encoding="latin-1")).texts == ["café crème"]
    path.write_bytes("\ufefftext,label\nx,1\n".encode())  # a UTF-8 byte-order mark is not part of the header
    assert read_examples(path, DataConfig()).texts == ["x"]


def test_json_label_rule(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"text": "a", "label": 1},
        {"text": "b", "label": 1.0},
        {"text": "c", "label": "1"},
        {"text": "d", "label": 2},
        {"text": "e", "label": 0.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_examples(path, DataConfig()).labels == ["1", "1", "1", "2", "0.5"]
    path.write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert read_examples(path, DataConfig()).labels == ["true", "false"]
    path.write_text('{"text": "a", "label": true}\n{"text": "b", "label": 1}\n')
    with pytest.raises(DataError, match="line 2.*mixes booleans and numbers"):
        read_examples(path, DataConfig())


def test_label_vocabulary_sorts_any_unicode():
    assert label_vocabulary(["²", "1", "10"]) == ["1", "10", "²"]
    assert label_vocabulary(["10", "9", "-1"]) == ["-1", "9", "10"]
    assert label_vocabulary(["١", "٢"]) == ["١", "٢"]  # Arabic-Indic digits: sorted as text, no crash


def test_prepare_images_keeps_every_file_and_never_leaks(tmp_path):
    src = tmp_path / "src"
    write_images(src, 5, 0)  # ants, bees: 5 each
    write_images(src / "ants" / "nested", 5, 1)  # 10 more ants, under nested/{ants,bees}/ with the same names
    (tmp_path / "src" / "bees" / "broken.jpeg").write_bytes(b"")
    out = tmp_path / "out"
    counts = prepare_images(src, out, (0.8, 0.1, 0.1), seed=0)
    # ants: 15 -> 11/2/2; bees: 5 -> 3/1/1 (a small class still gets a val and a test image)
    assert counts == {"train": 14, "val": 3, "test": 3, "skipped_unreadable": 1}
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_RECORD)
    assert len(written) == 20  # every readable image, none overwritten
    names = [(p.parts[1], p.name) for p in written]
    assert len(set(names)) == 20  # one image, one split
    assert all(any(d.iterdir()) for d in out.glob("*/*"))  # no empty class folder
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        prepare_images(src, out, (0.8, 0.1, 0.1), seed=0)
    counts = prepare_images(src, out, (0.5, 0.5, 0.0), seed=0, overwrite=True, num_classes=1)
    assert counts["train"] + counts["val"] == 15 and counts["test"] == 0
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "train", "val"]  # the old test/ went
    assert [p.name for p in (out / "train").iterdir()] == ["ants"]


def test_label_order_is_the_same_in_every_process():
    """'1' and '01' are equal as integers: they stay two classes, in one order whatever PYTHONHASHSEED is."""
    import os
    import subprocess
    import sys

    assert label_vocabulary(["1", "01", "2", "1"]) == ["01", "1", "2"]
    code = "from fulltune.data.text import label_vocabulary as v; print(v(['2', '1', '01', '001', '10']))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=str(seed)), capture_output=True, text=True
        ).stdout
        for seed in (0, 1, 5, 7)
    }
    assert seen == {"['001', '01', '1', '2', '10']\n"}


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,sentence,label\na,b,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: the header names column 'sentence' twice"):
        read_examples(path, DataConfig(text_column="sentence"))


def test_lm_records_must_hold_strings(tmp_path):
    from fulltune.data.lm import read_records

    path = tmp_path / "train.jsonl"
    for row, key in (
        ({"text": None}, "text"),
        ({"text": ["a", "b"]}, "text"),
        ({"prompt": "q", "response": 3}, "response"),
    ):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"line 1: '{key}' is .*, expected a string"):
            read_records(path, DataConfig())
    path.write_text('{"prompt": "q", "response": "a"}\n{"text": "t"}\n')
    assert read_records(path, DataConfig()) == [("q", "a"), ("t", None)]


def test_hidden_class_folders_are_said(tmp_path):
    from fulltune.data.images import scan_split

    write_images(tmp_path / "train", 2, 0)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    with pytest.warns(UserWarning, match=r"hidden folders are not classes: \.ipynb_checkpoints"):
        assert scan_split(tmp_path / "train").classes == ["ants", "bees"]


def test_prepare_images_says_nothing_of_zero_unreadable_images(tmp_path, capsys):
    from fulltune.cli import main

    write_images(tmp_path / "src", 5, 0)
    assert main(["prepare-images", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert re.search(r"^wrote .*/out: train \d+, val \d+, test \d+ images$", said, flags=re.M), said
    assert "unreadable" not in said and "skipped" not in said
    (tmp_path / "src" / "bees" / "broken.jpeg").write_bytes(b"")
    assert main(["prepare-images", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out2")]) == 0
    assert "; 1 unreadable image skipped" in capsys.readouterr().out
