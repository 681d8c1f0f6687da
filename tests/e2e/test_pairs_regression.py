"""Sentence pairs and regression on a tiny BERT: `task: auto` reads each layout, a run resumes mid-epoch bit for bit,
evaluate's metrics are scipy's and scikit-learn's, predict reads pairs and prints numbers, and the export loads in
plain transformers (a regression as problem_type "regression") with fulltune's outputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, TINY_BERT, base_overrides, call_cli
from safetensors.torch import load_file

from fulltune.cli import main
from fulltune.config import load_config
from fulltune.data import text as txt
from fulltune.errors import DataError
from fulltune.eval.metrics import summarize_regression
from fulltune.eval.predict import encode_texts, regress
from fulltune.model.bundle import packaged_minilm_path
from fulltune.model.exported import load_exported
from fulltune.planning.facts import count_examples
from fulltune.training.tasks import infer_task
from fulltune.training.trainer import train


def write_regression(root: Path, sizes: dict[str, int]) -> Path:
    """JSONL texts scored near 0.8 (positive) or 0.2 (negative), with noise: float labels."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rng = random.Random(split)
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                good = i % 2
                text = f"{rng.choice(POSITIVE if good else NEGATIVE)} number {rng.randint(0, 999)}"
                f.write(json.dumps({"text": text, "label": round((0.8 if good else 0.2) + rng.uniform(-0.1, 0.1), 3)}))
                f.write("\n")
    return root


def write_pairs(root: Path, sizes: dict[str, int]) -> Path:
    """sentence1/sentence2/label TSVs: label 1 when both sentences have the same sentiment."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rng = random.Random(split)
        lines = ["sentence1\tsentence2\tlabel"]
        for i in range(n):
            same = i % 2
            a = rng.choice(POSITIVE)
            lines.append(f"{a}\t{rng.choice(POSITIVE if same else NEGATIVE)}\t{same}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


SIZES = {"train": 16, "val": 8, "test": 8}


def _cfg(out: Path, data: Path, **extra: object):
    return load_config(
        None,
        base_overrides(
            out,
            TINY_BERT,
            data__data_dir=str(data),
            data__batch_size=4,
            data__max_length=32,
            training__num_epochs=2,
            checkpoint__save_every_steps=3,
            checkpoint__keep_last=0,
            **extra,
        ),
    )


def _train_and_resume(tmp_path: Path, data: Path, **extra: object) -> Path:
    """A run of 2 epochs (4 steps each), and the same run resumed from its mid-epoch step-3 checkpoint: the final
    weights are equal bit for bit. Returns the uninterrupted run's folder."""
    full = tmp_path / "full"
    train(_cfg(full, data, **extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-step-3", resumed / "checkpoint-step-3")
    train(_cfg(resumed, data, **extra), resume="auto")
    a = load_file(str(full / "checkpoint-epoch-2" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-epoch-2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return full


def _plain(folder: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def test_regression_metrics_are_scipys_and_sklearns():
    from scipy import stats
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    truth = [0.1, 0.5, 0.25, 0.9, 0.75, 0.3, 0.6]
    pred = [0.2, 0.4, 0.35, 0.7, 0.8, 0.1, 0.65]
    m = summarize_regression(pred, truth)
    assert m["mse"] == pytest.approx(mean_squared_error(truth, pred), abs=1e-12)
    assert m["mae"] == pytest.approx(mean_absolute_error(truth, pred), abs=1e-12)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, truth).statistic, abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, truth).statistic, abs=1e-12)
    assert m["loss"] == m["mse"] and m["examples"] == 7
    flat = summarize_regression([0.5] * 4, [0.1, 0.2, 0.3, 0.4])  # scipy: NaN; here no correlation, 0
    assert flat["pearson"] == 0.0 and flat["spearman"] == 0.0


def test_pairs_are_encoded_as_the_tokenizers_pair():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    ids, types = txt.encode(tok, ["a good film", "i hated it"], ["a real mess", "wonderful"], 32)
    want = tok(["a good film", "i hated it"], ["a real mess", "wonderful"], truncation=True, max_length=32)
    assert ids == want["input_ids"] and types == want["token_type_ids"]
    assert tok.decode(ids[0]) == "[CLS] a good film [SEP] a real mess [SEP]"
    assert types[0] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    batch = txt.PadCollator(tok.pad_token_id)(
        [
            {"input_ids": torch.tensor(i), "token_type_ids": torch.tensor(t), "labels": 0.5}
            for i, t in zip(ids, types, strict=True)
        ]
    )
    assert batch["token_type_ids"].tolist()[1] == types[1] + [0] * (len(ids[0]) - len(ids[1]))
    assert batch["labels"].dtype == torch.float32
    assert txt.encode(tok, ["a good film"], None, 32) == (tok(["a good film"])["input_ids"], None)


def test_auto_reads_each_layout_and_names_what_a_table_lacks(tmp_path):
    def task_of(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return infer_task(load_config(None, {"data.train_file": str(path)}))

    assert task_of("a.csv", "text,label\nfine,1\nbad,0\n") == "text_classification"
    assert task_of("b.jsonl", '{"text": "fine", "label": 0.75}\n{"text": "bad", "label": 0}\n') == "text_regression"
    assert task_of("c.csv", "text,label\nfine,3.8\nbad,1.0\n") == "text_regression"
    assert task_of("d.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0\n") == "text_classification"
    assert task_of("e.jsonl", '{"prompt": "q", "response": "a"}\n') == "causal_lm"
    cfg = load_config(None, {"data.train_file": str(tmp_path / "d.tsv")})
    assert txt.read_examples(tmp_path / "d.tsv", cfg.data).columns == ("sentence1", "sentence2")
    # `plan` sizes a regression's head as training builds it: one output
    regression = load_config(None, {"data.train_file": str(tmp_path / "c.csv")})
    assert count_examples(regression, "text_regression")[1] == ["label"]
    with pytest.raises(DataError) as err:
        task_of("f.csv", "question,answer\nq,a\n")
    line = str(err.value)
    assert "'" + str(tmp_path / "f.csv") + "' fits no task (task: auto): its columns are question, answer" in line
    assert "text_regression: " in line and "sentence1/sentence2" in line and "causal_lm: " in line
    assert "\n" not in line


def test_regression_trains_resumes_evaluates_predicts_and_exports(tmp_path, capsys):
    data = write_regression(tmp_path / "data", SIZES)
    full = _train_and_resume(tmp_path, data)
    log = (full / "train.log").read_text()
    assert "task text_regression (task: auto, read from the data)" in log and "[val] step 4 epoch 1: mse " in log
    assert json.loads((full / "best" / "config.json").read_text())["problem_type"] == "regression"
    assert "- Output: one number, the `label` column's" in (full / "best" / "README.md").read_text()

    assert main(["evaluate", "--checkpoint", str(full / "best"), "--data_dir", str(data), "--split", "test"]) == 0
    out = full / "eval" / "best-test"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    again = summarize_regression([r["predicted"] for r in rows], [r["label"] for r in rows])
    for key in ("mse", "mae", "pearson", "spearman"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-5)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(full / "best"), "--text", "i loved it", "--text", "a mess"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in printed] == ["i loved it", "a mess"]
    assert all(isinstance(r["prediction"], float) for r in printed)

    assert main(["export", str(full), "--output_dir", str(tmp_path / "ship")]) == 0
    model, tok = _plain(tmp_path / "ship")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    texts = ["i loved it", "a bad and boring film number 3"]
    with torch.no_grad():
        plain = model(**tok(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
    ours = regress(load_exported(full / "best", torch.device("cpu")), texts)
    torch.testing.assert_close(plain, torch.tensor(ours), atol=1e-5, rtol=0)
    html = (full / "report.html").read_text()
    assert "Prediction vs truth: test set" in html and "Confusion matrix" not in html and "Pearson" in html


def test_pairs_train_resume_evaluate_predict_and_export(tmp_path, capsys):
    data = write_pairs(tmp_path / "data", SIZES)
    full = _train_and_resume(tmp_path, data)
    saved = (full / "config.yaml").read_text()
    assert "text_column: sentence1" in saved and "text_pair_column: sentence2" in saved
    assert main(["evaluate", "--checkpoint", str(full / "best"), "--data_dir", str(data), "--split", "test"]) == 0
    summary = json.loads((full / "summary.json").read_text())
    evaluated = json.loads((full / "eval" / "best-test" / "metrics.json").read_text())
    assert evaluated["accuracy"] == summary["test"]["accuracy"] and evaluated["examples"] == 8
    from sklearn.metrics import accuracy_score, f1_score

    rows = [json.loads(line) for line in (full / "eval" / "best-test" / "predictions.jsonl").read_text().splitlines()]
    gold, predicted = [r["label"] for r in rows], [r["predicted"] for r in rows]
    assert evaluated["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    assert evaluated["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-12)

    capsys.readouterr()
    argv = ["predict", "--checkpoint", str(full / "best"), "--text", "i loved it", "--text_pair", "a real mess"]
    assert call_cli(*argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["input"] == "i loved it" and row["text_pair"] == "a real mess" and len(row["top_k"]) == 2
    assert call_cli("predict", "--checkpoint", str(full / "best"), "--file", str(data / "test.tsv")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8
    with pytest.raises(DataError, match="give one --text_pair per --text"):
        call_cli("predict", "--checkpoint", str(full / "best"), "--text", "i loved it")

    call_cli("export", str(full), "--output_dir", str(tmp_path / "ship"))
    model, tok = _plain(tmp_path / "ship")
    pairs = [("i loved it", "a real mess"), ("a real delight", "wonderful acting all round")]
    with torch.no_grad():
        enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
        plain = model(**enc).logits
        bundle = load_exported(full / "best", torch.device("cpu"))
        ours = bundle.model(**encode_texts(bundle, pairs)).logits
    assert enc["token_type_ids"].max() == 1
    torch.testing.assert_close(plain, ours, atol=1e-5, rtol=0)


def test_huber_loss_and_the_metrics_directions(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from fulltune.eval.losses import huber_loss, mse_loss
    from fulltune.training.tasks import task_record, validation_metric

    def cfg(**extra: object):
        return load_config(None, {k.replace("__", "."): v for k, v in extra.items()})

    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    model = BertForSequenceClassification(BertConfig(**kwargs, num_labels=1, problem_type="regression")).eval()
    batch = {"input_ids": torch.tensor([[101, 2204, 102], [101, 2919, 102]]), "labels": torch.tensor([3.0, -0.2])}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"]).logits.squeeze(-1)
        assert torch.allclose(
            huber_loss(model, batch, 0.0)[0], torch.nn.functional.huber_loss(out, batch["labels"], reduction="sum")
        )
        assert torch.allclose(mse_loss(model, batch, 0.0)[0], ((out - batch["labels"]) ** 2).sum())
        # transformers' own regression loss (the exported model's) is the same MSE, averaged
        hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert torch.allclose(hf, mse_loss(model, batch, 0.0)[0] / 2)
    assert task_record(cfg(training__loss="huber"), "text_regression").loss is huber_loss
    # the validation loss is the loss training minimises: Huber's mean where training.loss is huber, else the MSE
    pred, truth = [0.5, 2.0, -3.0], [0.0, 0.0, 0.0]
    assert summarize_regression(pred, truth, "huber")["loss"] == pytest.approx((0.125 + 1.5 + 2.5) / 3)
    assert summarize_regression(pred, truth)["loss"] == pytest.approx(summarize_regression(pred, truth)["mse"])
    assert validation_metric(cfg(), task_record(cfg(), "text_regression")) == ("mse", False)
    assert validation_metric(cfg(training__metric="pearson"), task_record(cfg(), "text_regression")) == (
        "pearson",
        True,
    )


def test_a_datasets_source_of_pairs_with_float_labels_is_a_regression_of_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    hub = tmp_path / "hub"
    rng = random.Random(0)
    rows = {
        "premise": [rng.choice(POSITIVE) for _ in range(12)],
        "hypothesis": [rng.choice(NEGATIVE) for _ in range(12)],
    }
    rows["label"] = [round(rng.uniform(0, 5), 2) for _ in range(12)]
    datasets.Dataset.from_dict(rows).save_to_disk(str(hub))
    cfg = load_config(
        None,
        base_overrides(
            tmp_path / "run",
            TINY_BERT,
            data__dataset_name=str(hub),
            data__batch_size=4,
            training__num_epochs=1,
            data__max_length=32,
        ),
    )
    summary = train(cfg)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "text_column: premise" in saved and "text_pair_column: hypothesis" in saved
    assert summary["task"] == "text_regression" and "mse" in summary["best_val"]
