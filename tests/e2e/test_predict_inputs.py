"""`predict` reads what `evaluate` reads: --file as a table by the run's text column (a .txt file as one text per
line), every --text given, and for a causal LM every --prompt and a JSONL file's prompt column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_bert_train_args

from fulltune import cli


def _rows(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.fixture
def best(tmp_path: Path, text_data: Path) -> Path:
    assert cli.main(tiny_bert_train_args(text_data, tmp_path / "run", "training.num_epochs=1")) == 0
    return tmp_path / "run" / "best"


def test_predict_file_reads_tables_by_the_text_column_and_takes_every_text(
    best: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    table = tmp_path / "reviews_test.csv"
    table.write_text('sentence,label\n"a good, fine film",pos\nawful acting,neg\n', encoding="utf-8")
    assert cli.main(["predict", "--checkpoint", str(best), "--file", str(table)]) == 0
    assert [r["input"] for r in _rows(capsys)] == ["a good, fine film", "awful acting"]  # no header, no ",pos"

    lines = tmp_path / "texts.txt"
    lines.write_text("sentence,label\nsecond line\n", encoding="utf-8")  # a .txt file: every line is a text
    assert cli.main(["predict", "--checkpoint", str(best), "--file", str(lines)]) == 0
    assert [r["input"] for r in _rows(capsys)] == ["sentence,label", "second line"]

    assert cli.main(["predict", "--checkpoint", str(best), "--text", "A", "--text", "B"]) == 0
    assert [r["input"] for r in _rows(capsys)] == ["A", "B"]

    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("review\tlabel\nfine\tpos\n", encoding="utf-8")
    assert cli.main(["predict", "--checkpoint", str(best), "--file", str(wrong)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no column 'sentence'" in err and "review" in err


def test_a_causal_lms_file_gives_its_prompt_column(tmp_path: Path) -> None:
    from fulltune.eval.predict import text_inputs

    records = tmp_path / "qa.jsonl"
    records.write_text('{"prompt": "Q: one?\\nA:", "response": " 1"}\n{"prompt": "Q: two?\\nA:"}\n', encoding="utf-8")
    data = {"prompt_column": "prompt", "text_column": "text", "encoding": "utf-8"}
    assert text_inputs(None, str(records), data, causal_lm=True) == ["Q: one?\nA:", "Q: two?\nA:"]
    assert text_inputs(["a", "b"], str(records), data, causal_lm=True) == ["a", "b"]
