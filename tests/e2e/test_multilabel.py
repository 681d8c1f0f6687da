"""Multi-label classification: label sets from JSON lists or data.label_separator (files and `datasets`), task auto,
metrics equal to scikit-learn's, thresholds tuned on validation and kept with the weights, a bit-identical resume
mid-epoch, evaluate / predict / report.html, and an export that plain transformers loads as a multi-label model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, base_overrides, call_cli

from fulltune.config import config_from_dict, load_config
from fulltune.data import multilabel
from fulltune.errors import DataError
from fulltune.eval.metrics import multi_label_metrics, multi_label_scores, tune_thresholds
from fulltune.model.exported import load_exported
from fulltune.runtime.device import resolve_precision
from fulltune.training.tasks import infer_task, read_labels
from fulltune.training.trainer import train

WORDS = {"money": ["bank", "stock", "price"], "sport": ["match", "goal", "team"], "tech": ["chip", "code", "robot"]}


def write_split(path: Path, n: int, seed: int, separator: str | None = None) -> None:
    """n texts of one or two topics' words; JSONL label lists, or a CSV label cell joined by `separator`."""
    rng = random.Random(seed)
    lines = [] if separator is None else ["text,label"]
    for _ in range(n):
        labels = sorted(rng.sample(sorted(WORDS), rng.choice([1, 1, 2])))
        words = [rng.choice(WORDS[name]) for name in labels] + ["the", "a"]
        rng.shuffle(words)
        if separator is None:
            lines.append(json.dumps({"text": " ".join(words), "label": labels}))
        else:
            lines.append(f'{" ".join(words)},"{separator.join(labels)}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def ml_data(tmp_path: Path) -> Path:
    root = tmp_path / "ml"
    root.mkdir()
    for split, n, seed in (("train", 32, 0), ("val", 8, 1), ("test", 8, 2)):
        write_split(root / f"{split}.jsonl", n, seed)
    return root


def ml_config(out: Path, data: Path, **extra: object):  # -> Config
    return load_config(None, base_overrides(out, TINY_BERT, data__data_dir=str(data), **extra))


def test_label_sets_from_lists_and_separators(tmp_path, ml_data):
    cfg = ml_config(tmp_path / "run", ml_data)
    assert infer_task(cfg) == "multi_label_classification"  # task auto: the JSONL labels are lists
    labels, (_, train) = read_labels(cfg, "multi_label_classification")
    assert labels == ["money", "sport", "tech"] and all(isinstance(names, tuple) for names in train.labels)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    write_split(csv_dir / "train.csv", 16, 0, separator="|")
    csv_cfg = ml_config(tmp_path / "run2", csv_dir, data__label_separator="|")
    assert infer_task(csv_cfg) == "multi_label_classification"
    _, (_, csv_train) = read_labels(csv_cfg, "multi_label_classification")
    json_train = multilabel.read_examples(ml_data / "train.jsonl", cfg.data)
    assert csv_train.labels == json_train.labels[:16]  # the same seeded sets, written two ways
    assert multilabel.multi_hot(json_train, labels)[0] == [float(n in json_train.labels[0]) for n in labels]
    plain = ml_config(tmp_path / "run3", csv_dir)  # no separator: "a|b" would be one class
    assert infer_task(plain) == "text_classification"
    read = multilabel.label_reader(csv_cfg.data)
    assert read(["b", "a", "b", 3, 2.0], "x") == ("b", "a", "3", "2") and read(" a| b ", "x") == ("a", "b")
    assert read([], "x") == () and read("", "x") == () and read("a|b|", "x") == ("a", "b")
    for bad, said in (
        (None, "no labels in field 'label'"),
        ({"a": 1}, "not a list of labels"),
        ([None], "is not a string or a number"),
        ("a||b", "an empty label"),
    ):
        with pytest.raises(DataError, match=said):
            read(bad, "'f.csv' row 3 (line 4)")
    (ml_data / "val.jsonl").write_text('{"text": "x", "label": ["money", "weather"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"val.jsonl' row 1 \(line 1\): label 'weather' is not among the train"):
        multilabel.multi_hot(multilabel.read_examples(ml_data / "val.jsonl", cfg.data), labels)


def test_datasets_sequence_of_class_label(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["money", "sport", "tech"]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Sequence(datasets.ClassLabel(names=names))}
    )
    rows = {"text": ["bank goal", "chip", "team", "code price"], "label": [[0, 1], [2], [1], [2, 0]]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "hub"))
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_BERT, data__dataset_name=str(tmp_path / "hub")))
    assert infer_task(cfg) == "multi_label_classification"
    labels, (files, train) = read_labels(cfg, "multi_label_classification")
    assert labels == names and train.labels == [("money", "sport"), ("tech",), ("sport",), ("tech", "money")]
    assert files["val"].texts == rows["text"]


def test_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(40, 5, generator=g)
    target = (torch.rand(40, 5, generator=g) > 0.6).float()
    target[:, 4] = 0  # a label never true, and (threshold 1 - 1e-6) never predicted: F1 0, as scikit-learn says
    thresholds = [0.5, 0.3, 0.7, 0.5, 1 - 1e-6]
    ours = multi_label_scores(prob, target, thresholds)
    pred = (prob >= torch.tensor(thresholds)).int().numpy()
    y = target.int().numpy()
    for average, key in (("micro", "micro_f1"), ("macro", "macro_f1")):
        assert ours[key] == pytest.approx(metrics.f1_score(y, pred, average=average, zero_division=0), abs=1e-12)
    per_label = metrics.f1_score(y, pred, average=None, zero_division=0)
    assert ours["per_label_f1"] == pytest.approx(list(per_label), abs=1e-12)
    assert ours["subset_accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))
    assert ours["micro_precision"] == pytest.approx(metrics.precision_score(y, pred, average="micro"))
    # Tuning: each label's threshold gives that label's best F1 on the grid (nearest 0.5 among ties).
    tuned = tune_thresholds(prob, target)
    assert tuned[4] == 0.5  # no positives: every threshold ties
    best = multi_label_scores(prob, target, tuned)["per_label_f1"]
    for t in (0.05, 0.25, 0.5, 0.75, 0.95):
        fixed = multi_label_scores(prob, target, [t] * 5)["per_label_f1"]
        assert all(b >= f - 1e-12 for b, f in zip(best, fixed, strict=True))


def _run_config(out: Path, data: Path):  # -> Config
    return ml_config(
        out,
        data,
        data__batch_size=4,
        training__num_epochs=2,
        training__base_learning_rate=3e-3,
        checkpoint__save_every_steps=3,
        checkpoint__keep_last=0,
        eval__tune_thresholds=True,
    )


def test_train_resume_evaluate_predict_export(tmp_path, ml_data, capsys):
    full = tmp_path / "full"
    summary = train(_run_config(full, ml_data))
    assert {"micro_f1", "macro_f1"} <= set(summary["test"])
    # Resumed mid-epoch (step 3 of 8 per epoch): the same weights, bit for bit, and the same tuned thresholds.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-step-3", resumed / "checkpoint-step-3")
    train(_run_config(resumed, ml_data), resume="auto")
    for name in ("checkpoint-epoch-2", "best"):
        a, b = (load_exported(d / name).model.state_dict() for d in (full, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert (full / name / "thresholds.json").read_text() == (resumed / name / "thresholds.json").read_text()
    best = full / "best"
    tuned = json.loads((best / "thresholds.json").read_text())["thresholds"]
    assert "thresholds.json" in (best / "README.md").read_text()
    # evaluate scores at the tuned thresholds and writes per-label F1; its figures are the run's test figures.
    call_cli("evaluate", "--checkpoint", str(best), "--data_dir", str(ml_data), "--split", "test")
    written = json.loads((full / "eval" / "best-test" / "metrics.json").read_text())
    assert written["micro_f1"] == pytest.approx(summary["test"]["micro_f1"], abs=1e-6)
    assert {k: v["threshold"] for k, v in written["per_label"].items()} == tuned
    # predict prints every label at or above its threshold, and only those.
    capsys.readouterr()
    call_cli("predict", "--checkpoint", str(best), "--text", "goal bank the", "--text", "chip")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bundle = load_exported(best)
    enc = bundle.tokenizer(["goal bank the", "chip"], padding=True, return_tensors="pt")
    with torch.no_grad():
        prob = bundle.model(**enc).logits.sigmoid()
    for row, p in zip(rows, prob, strict=True):
        expected = {name for i, name in enumerate(tuned) if float(p[i]) >= tuned[name]}
        assert {x["label"] for x in row["labels"]} == expected
    html = (full / "report.html").read_text(encoding="utf-8")
    assert "Per-label F1: test set" in html and "Confusion matrix" not in html
    _export_loads_in_transformers(best, tmp_path / "export", ml_data)


def _export_loads_in_transformers(best: Path, out: Path, data: Path) -> None:
    """`fulltune export` keeps thresholds.json; transformers loads the folder as a multi-label classifier whose
    probabilities and own (BCE) loss are fulltune's to 1e-5."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    call_cli("export", str(best), "--output_dir", str(out))
    assert (out / "thresholds.json").read_text() == (best / "thresholds.json").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.problem_type == "multi_label_classification"
    bundle = load_exported(out)
    cfg = config_from_dict(bundle.extra["fulltune_config"])
    labels = bundle.extra["labels"]
    examples = multilabel.read_examples(data / "test.jsonl", cfg.data)
    target = torch.tensor(multilabel.multi_hot(examples, labels))
    loader = [bundle.tokenizer(examples.texts, padding=True, return_tensors="pt") | {"labels": target}]
    ours = multi_label_metrics(
        bundle.model, loader, [0.5] * 3, torch.device("cpu"), resolve_precision("no", torch.device("cpu"))
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        theirs = model(**tok(examples.texts, padding=True, return_tensors="pt"), labels=target)
    torch.testing.assert_close(theirs.logits.sigmoid(), ours["probabilities"], atol=1e-5, rtol=0)
    assert float(theirs.loss) == pytest.approx(ours["loss"], abs=1e-5)  # transformers' BCE, mean over labels


def test_plan_counts_label_sets_and_dry_runs(tmp_path, ml_data, capsys):
    """`fulltune plan` reads the label sets (32 examples, 3 labels) and its dry run steps the BCE loss on multi-hot
    rows."""
    cfg_path = tmp_path / "plan.yaml"
    cfg_path.write_text(json.dumps(base_overrides(tmp_path / "run", TINY_BERT) | {"data.batch_size": 4}))
    argv = ["plan", "--config", str(cfg_path), "--data_dir", str(ml_data), "--methods", "full", "--json"]
    assert call_cli(*argv, "--memory_budget", "4GiB") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "multi_label_classification" and report["examples"] == 32
    assert report["methods"][0]["measured"] is not None  # the dry run ran
