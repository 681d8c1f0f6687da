"""Every bad input gives one clear line naming the file, row or key, and a non-zero exit; a NaN loss stops the run
and keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CLIP, tiny_bert_train_args, write_images

from fulltune.cli import main
from fulltune.state import checkpoint as ckpt


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_missing_data_folder(capsys, tmp_path):
    code, err = run_cli(capsys, *tiny_bert_train_args(tmp_path / "nope", tmp_path / "out"))
    assert code != 0 and "nope" in err and "does not exist" in err


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, *tiny_bert_train_args(tmp_path / "empty", tmp_path / "out"))
    assert code != 0 and "no training table" in err


def test_empty_file(capsys, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.tsv").write_text("")
    code, err = run_cli(capsys, *tiny_bert_train_args(d, tmp_path / "out"))
    assert code != 0 and "train.tsv" in err and "empty" in err


def test_missing_column(capsys, text_data, tmp_path):
    code, err = run_cli(capsys, *tiny_bert_train_args(text_data, tmp_path / "out"), "data.label_column=sentiment")
    assert code != 0 and "no column 'sentiment'" in err and "sentence, label" in err


def test_unknown_label_in_val(capsys, text_data, tmp_path):
    with open(text_data / "val.tsv", "a") as f:
        f.write("some new text\t7\n")
    code, err = run_cli(capsys, *tiny_bert_train_args(text_data, tmp_path / "out"))
    assert code != 0 and "val.tsv" in err and "row 9" in err and "label '7'" in err


def test_config_typo(capsys, text_data, tmp_path):
    code, err = run_cli(capsys, *tiny_bert_train_args(text_data, tmp_path / "out"), "training.base_learnig_rate=1e-4")
    assert code == 2 and "training.base_learnig_rate" in err and "base_learning_rate" in err


def test_config_wrong_type_and_yaml_typo(capsys, text_data, tmp_path):
    code, err = run_cli(capsys, *tiny_bert_train_args(text_data, tmp_path / "out"), "training.num_epochs=many")
    assert code == 2 and "training.num_epochs" in err and "integer" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  optimiser: adamw\n")
    code, err = run_cli(capsys, "train", "--config", str(bad), "--data_dir", str(text_data))
    assert code == 2 and "training.optimiser" in err and "valid keys" in err


def test_class_folder_without_readable_images(capsys, tmp_path):
    root = tmp_path / "img"
    write_images(root / "train", 3, 0)
    for p in (root / "train" / "bees").iterdir():
        p.write_bytes(b"not an image")
    code, err = run_cli(
        capsys,
        "train",
        "--data_dir",
        str(root),
        "--output_dir",
        str(tmp_path / "out"),
        f"model.tiny_config={json.dumps(TINY_CLIP)}",
        "logging.progress_bar=false",
    )
    assert code != 0 and "bees" in err and "no readable images" in err


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from fulltune.data.images import scan_split

    root = tmp_path / "img" / "train"
    write_images(root, 3, 0)
    (root / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match="broken.jpg"):
        folder = scan_split(root)
    assert len(folder.samples) == 6 and [p.name for p in folder.skipped] == ["broken.jpg"]


def test_image_class_in_val_that_train_lacks(capsys, tmp_path):
    root = tmp_path / "img"
    write_images(root / "train", 3, 0)
    write_images(root / "val", 1, 1)
    (root / "val" / "wasps").mkdir()
    (root / "val" / "ants" / "ants_0.png").rename(root / "val" / "wasps" / "w.png")
    code, err = run_cli(
        capsys,
        "train",
        "--data_dir",
        str(root),
        "--output_dir",
        str(tmp_path / "out"),
        f"model.tiny_config={json.dumps(TINY_CLIP)}",
        "logging.progress_bar=false",
    )
    assert code != 0 and "wasps" in err and "not among the train classes" in err


def test_checkpoint_that_is_not_one(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    code, err = run_cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data_dir", str(tmp_path))
    assert code != 0 and "is not a fulltune checkpoint" in err
    code, err = run_cli(capsys, "train", "--data_dir", str(tmp_path), "--resume", str(tmp_path / "ckpt"))
    assert code != 0 and "not a checkpoint folder" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(capsys, text_data, tmp_path, monkeypatch):
    import fulltune.training.tasks as tasks

    real = tasks.TASKS["text_classification"]
    calls = {"n": 0}

    def poisoned(model, batch, smoothing):
        loss, logits = real.loss(model, batch, smoothing)
        calls["n"] += 1
        return (loss * float("nan"), logits) if calls["n"] == 5 else (loss, logits)

    monkeypatch.setitem(
        tasks.TASKS,
        "text_classification",
        tasks.Task(real.build_data, poisoned, real.count, real.default_metric, real.higher_is_better),
    )
    out = tmp_path / "out"
    code, err = run_cli(
        capsys,
        *tiny_bert_train_args(text_data, out),
        "data.batch_size=4",
        "checkpoint.save_every_steps=2",
        "logging.log_every_steps=100",
        "checkpoint.keep_last=0",
    )
    assert code == 1
    assert "loss became nan at optimizer step 5" in err and "checkpoint-step-4" in err
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["checkpoint-step-2", "checkpoint-step-4"]


def test_demo_without_its_model_extra_is_one_line(capsys, tmp_path, monkeypatch):
    """The demo's weights are the extra fulltune[demo]: without it, one line naming the extra, nothing written."""
    from fulltune import demo

    monkeypatch.setattr(demo, "packaged_minilm_path", lambda: None)
    code, err = run_cli(capsys, "demo", "--output_dir", str(tmp_path / "demo"))
    assert code == 2 and "fulltune[demo]" in err and not (tmp_path / "demo").exists()
