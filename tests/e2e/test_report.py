"""A run a person can read: report.html and its inputs after a tiny 7-class image run, a resume that changes the
schedule, `fulltune report`, evaluate's output folder and predictions.jsonl, predict equal to transformers' pipeline
on the same export, macro-F1 equal to scikit-learn's, and both HTML pages rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BERT, TINY_CLIP, base_overrides, write_text_split
from PIL import Image

from fulltune.cli import main
from fulltune.compare.table import comparison_table
from fulltune.config import load_config
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.eval.metrics import summarize_confusion
from fulltune.report.html import build_comparison, build_report, per_class
from fulltune.training.trainer import train

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220), (120, 120, 120)]
CLASSES = ["red", "green", "blue", "yellow", "cyan", "magenta", "grey"]


def write_colour_images(root: Path, per_class: int, seed: int) -> None:
    rng = random.Random(seed)
    for name, base in zip(CLASSES, COLOURS, strict=True):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (36 + rng.randint(0, 20), 36 + rng.randint(0, 8)), base)
            px = im.load()
            for _ in range(80):
                px[rng.randrange(im.width), rng.randrange(im.height)] = tuple(rng.randrange(256) for _ in range(3))
            im.save(root / name / f"{name}_{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    for split, n, seed in (("train", 3, 0), ("val", 2, 1), ("test", 2, 2)):
        write_colour_images(root / "data" / split, n, seed)
    cfg = load_config(
        None,
        base_overrides(
            root / "run",
            TINY_CLIP,
            data__data_dir=str(root / "data"),
            data__batch_size=7,
            data__num_workers=0,
            training__num_epochs=2,
            logging__log_every_steps=1,
            training__base_learning_rate=1e-3,
        ),
    )
    train(cfg)
    return root / "run"


def test_run_folder_has_a_report_and_readable_logs(image_run):
    html = (image_run / "report.html").read_text()
    for section in (
        "What ran",
        "How fast",
        "Curves",
        "Confusion matrix: test set",
        "Per class",
        "Most confused pairs",
        "Starts and resumes",
        "Config",
        "image_classification",
        "learning rate per group",
        "gradient norm",
    ):
        assert section in html, section
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html)  # self-contained: nothing fetched
    assert html.count("<svg") == 5  # four charts and the confusion heatmap
    assert (image_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (image_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train" and "loss" in r]  # (not the per-epoch accuracy rows)
    val_rows = [r for r in rows if r["split"] == "val"]
    assert len(train_rows) == 6 and len(val_rows) == 2
    assert [r["epoch"] for r in train_rows] == [1, 1, 1, 2, 2, 2] and [r["epoch"] for r in val_rows] == [1, 2]
    assert all(r["grad_norm"] > 0 and set(r["lrs"]) for r in train_rows)
    assert "top5_accuracy" in val_rows[0]  # 7 classes: top-5 means something
    log = (image_run / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log)
    step_lines = [line for line in log if " step 3 epoch 1: loss " in line]
    assert step_lines and "| lr " in step_lines[0] and "| grad norm " in step_lines[0]
    assert any(" started: 6 optimizer steps planned" in line for line in log)
    done = next(line for line in log if " done: " in line)
    assert re.search(r"accuracy \d\.\d{1,4}( |\|)", done) and "report.html" in done  # rounded for people
    test_record = json.loads((image_run / "report" / "test.json").read_text())
    assert len(test_record["confusion_matrix"]) == 7 and sum(map(sum, test_record["confusion_matrix"])) == 14
    for key, paths in test_record["pair_examples"].items():  # example inputs are the confused images' paths
        true, _ = map(int, key.split(","))
        assert all(Path(p).is_file() and f"/{test_record['labels'][true]}/" in p for p in paths)


def test_resume_with_more_epochs_is_logged_and_report_rebuilds(image_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    cfg = load_config(run / "config.yaml", {"output_dir": str(run), "training.num_epochs": 3})
    train(cfg, resume="auto")
    history = [json.loads(x) for x in (run / "run_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["optimizer_step"] == 6 and history[1]["total_steps"] == 9
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoint-epoch-2'} at optimizer step 6 of 9" in log  # names the checkpoint
    assert "the schedule changed: 6 -> 9" in log
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert "resume" in (run / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a fulltune run folder" in capsys.readouterr().err


def test_evaluate_writes_beside_the_checkpoint_with_predictions(image_run, tmp_path):
    data = image_run.parent / "data"
    shutil.copytree(data / "val", tmp_path / "dev")
    metrics = evaluate_checkpoint(image_run / "best", data_dir=str(tmp_path), split="dev", batch_size=4, device="cpu")
    out = Path(metrics["output_dir"])
    assert out == (image_run / "eval" / "best-val").resolve()
    assert not any((image_run / "best").glob("eval*"))
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all(Path(r["input"]).is_file() and r["label"] in CLASSES for r in rows)
    assert all(len(r["top_k"]) == 5 and r["top_k"][0]["label"] == r["predicted"] for r in rows)
    assert sum(r["correct"] for r in rows) / 14 == pytest.approx(metrics["accuracy"])
    assert {"metrics.json", "confusion_matrix.csv", "confusion_matrix.png"} <= {p.name for p in out.iterdir()}
    assert "targets" not in json.loads((out / "metrics.json").read_text())
    with pytest.raises(Exception, match="--split 'holdout'"):
        evaluate_checkpoint(image_run / "best", data_dir=str(tmp_path), split="holdout")


def test_predict_equals_the_transformers_pipeline_on_an_image(image_run):
    from transformers import pipeline

    from fulltune.eval.predict import classify
    from fulltune.model.exported import load_exported

    export = image_run / "best"
    image = next((image_run.parent / "data" / "test" / "blue").glob("*.jpg"))
    ours = dict(classify(load_exported(export, "cpu"), [image], 7)[0])
    theirs = {
        r["label"]: r["score"]
        for r in pipeline("image-classification", model=str(export), device="cpu")(str(image), top_k=7)
    }
    assert ours.keys() == theirs.keys()
    for label, p in ours.items():
        assert abs(p - theirs[label]) < 1e-5, (label, p, theirs[label])


def test_predict_equals_the_transformers_pipeline_on_a_text(tmp_path):
    from transformers import pipeline

    from fulltune.eval.predict import classify
    from fulltune.model.exported import load_exported

    for split, n, seed in (("train", 16, 0), ("val", 4, 1)):
        write_text_split(tmp_path / f"{split}.tsv", n, seed)
    cfg = load_config(
        None,
        base_overrides(
            tmp_path / "run",
            TINY_BERT,
            data__data_dir=str(tmp_path),
            data__max_length=12,
            data__text_column="sentence",
            training__num_epochs=1,
            data__batch_size=8,
        ),
    )
    train(cfg)
    export = tmp_path / "run" / "best"
    text = "a wonderful story with excellent acting and a great deal more to say than fits in twelve tokens"
    bundle = load_exported(export, "cpu")
    ours = dict(classify(bundle, [text], 2)[0])
    clf = pipeline("text-classification", model=str(export), device="cpu")
    theirs = {r["label"]: r["score"] for r in clf(text, top_k=2, truncation=True, max_length=12)}
    for label, p in ours.items():
        assert abs(p - theirs[label]) < 1e-5
    untruncated = {r["label"]: r["score"] for r in clf(text, top_k=2)}
    assert any(abs(p - untruncated[k]) > 1e-6 for k, p in ours.items())  # the run's max_length (12) is applied


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_equals_scikit_learn(seed):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 9))
    y = rng.integers(0, n_classes, int(rng.integers(1, 40)))
    p = rng.integers(0, n_classes, len(y))
    if seed % 2:  # some classes appear only among the predictions, or only among the labels
        y[y == 0] = 1
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for t, q in zip(y, p, strict=True):
        confusion[t, q] += 1
    ours = summarize_confusion(confusion, 0, 0.0)["macro_f1"]
    assert ours == pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
    assert ("top5_accuracy" in summarize_confusion(confusion, 0, 0.0)) == (n_classes > 5)


def test_macro_f1_of_the_issue_example():
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for t, q in zip([0, 0, 0, 1, 1, 1], [0, 0, 2, 1, 1, 0], strict=True):
        confusion[t, q] += 1
    assert summarize_confusion(confusion, 0, 0.0)["macro_f1"] == pytest.approx(0.48889, abs=1e-5)
    assert [round(c["f1"], 4) for c in per_class(confusion.tolist())] == [0.6667, 0.8, 0.0]


def _not_blank(png: bytes) -> tuple[int, int, float]:
    import io

    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    ink = float((im.min(axis=2) < 200).mean())  # share of pixels that are not near-white
    return im.shape[1], im.shape[0], ink


def test_pages_render_in_headless_chromium(image_run, tmp_path):
    from chromium_page import chromium_binary, render

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    rows = []
    for method in ("full", "linear_probe"):
        run = tmp_path / method
        shutil.copytree(image_run, run)
        build_report(run, with_png=False)
        rows.append(
            {
                "method": method,
                "learning_rate": 1e-3,
                "run_dir": str(run),
                "status": "ok",
                "metric": "accuracy",
                "val": 0.5,
                "test": 0.4,
                "trainable_percent": 100.0,
                "peak_memory_bytes": 2**28,
                "wall_time_s": 3.0,
                "samples_per_s": 20.0,
            }
        )
    shutil.copy(image_run / "curves.png", tmp_path / "comparison.png")
    table = comparison_table(rows, {"seed": 0})
    pages = {"report": image_run / "report.html", "comparison": build_comparison(tmp_path, rows, {"seed": 0}, table)}
    keep = os.environ.get("FULLTUNE_SCREENSHOT_DIR")
    for name, page in pages.items():
        result = render(page)
        assert result.console_errors == [], result.console_errors
        assert result.facts["images"] or name == "report", f"{name}: no image"  # the report draws only SVG
        assert all(i["complete"] and i["width"] > 0 for i in result.facts["images"]), result.facts["images"]
        assert result.facts["svgs"] >= 2
        width, height, ink = _not_blank(result.screenshot)
        assert width == 1280 and height > 600 and ink > 0.02, (name, width, height, ink)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"{name}.png").write_bytes(result.screenshot)


def test_text_run_keeps_every_step_the_lr_schedule_and_the_texts_as_written(tmp_path):
    """Every optimizer step's loss in metrics.jsonl, the LR schedule with its warmup in report/lr_schedule.json, and
    the confused examples of the report as the original texts (not decoded lowercased tokens)."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n, seed in (("train", 32, 0), ("val", 16, 1), ("test", 16, 2)):
        write_text_split(data / f"{split}.tsv", n, seed)
        lines = (data / f"{split}.tsv").read_text().splitlines()
        cased = [lines[0]] + [f"{t.title()} Überraschend, ODER?\t{y}" for t, y in (x.split("\t") for x in lines[1:])]
        (data / f"{split}.tsv").write_text("\n".join(cased) + "\n", encoding="utf-8")
    cfg = load_config(
        None,
        base_overrides(
            tmp_path / "run",
            TINY_BERT,
            data__data_dir=str(data),
            data__text_column="sentence",
            data__batch_size=4,
            training__num_epochs=1,
            training__warmup_steps=3,
            logging__log_every_steps=3,
        ),
    )
    train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [s for r in rows if r["split"] == "train" and "step_losses" in r for s, _ in r["step_losses"]]
    assert logged == list(range(1, 7))  # steps 1-6, each once (8 batches: logged at 3 and 6)
    schedule = json.loads((run / "report" / "lr_schedule.json").read_text())
    assert schedule["steps"] == list(range(1, 9))
    lrs = next(iter(schedule["lrs"].values()))
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[3] == max(lrs) and lrs[-1] < lrs[3]  # warmup, then decay
    texts = {
        line.split("\t")[0] for split in ("val", "test") for line in (data / f"{split}.tsv").read_text().splitlines()
    }
    examples = [
        x
        for rec in ("test", "val_best")
        for xs in json.loads((run / "report" / f"{rec}.json").read_text())["pair_examples"].values()
        for x in xs
    ]
    assert examples and all(x in texts for x in examples), examples[:3]
    random_init = "bert, randomly initialised from a config (model.tiny_config)"  # never "pretrained weights"
    card = (run / "best" / "README.md").read_text()
    assert f"- Base model: {random_init}" in card and "pretrained weights" not in card
    assert random_init in (run / "report.html").read_text()
    assert f"model {random_init}" in (run / "train.log").read_text()
