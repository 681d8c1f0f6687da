"""The training loop on tiny random models: it learns, accumulation is exact, resume is bit-identical, a crash
mid-save loses nothing, and the export loads with plain transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_CLIP, TINY_VIT, base_overrides, tiny_bert_text_config
from safetensors.torch import load_file

from fulltune.config import load_config
from fulltune.files import safestate as safestate
from fulltune.state import checkpoint as ckpt
from fulltune.training.tasks import TASKS
from fulltune.training.trainer import setup, train


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol == 0.0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("tiny,kind", [(TINY_BERT, "text"), (TINY_CLIP, "image"), (TINY_VIT, "image")])
def test_overfits_eight_samples(tmp_path, text_data, image_data, tiny, kind):
    data = text_data if kind == "text" else image_data
    cfg = load_config(
        None,
        base_overrides(
            tmp_path / "run",
            tiny,
            data__data_dir=str(data),
            data__text_column="sentence",
            data__max_samples=8,
            model__dropout=0.0,
            data__batch_size=8,
            training__base_learning_rate=3e-3,
            training__warmup_ratio=0.0,
            training__lr_scheduler="constant",
            data__augmentation={"random_resized_crop": False, "horizontal_flip": False},
            data__num_workers=0,
        ),
    )
    run = setup(cfg)
    task = TASKS[run.task_name]
    train_set = run.data.train
    assert len(train_set) == 8  # of the 12 training images or 32 texts
    batch = run.data.collate([train_set[i] for i in range(8)])
    run.model.train()
    for _ in range(150):
        loss, _ = task.loss(run.model, batch, 0.0)
        (loss / 8).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    with torch.no_grad():
        final = float(task.loss(run.model, batch, 0.0)[0]) / 8
    assert final < 0.05, final


_text_cfg = tiny_bert_text_config


def test_accumulation_2x2_equals_batch_of_4(tmp_path, text_data):
    common = dict(
        model__dropout=0.0,
        data__group_by_length=False,
        training__max_steps=3,
        training__num_epochs=1,
        checkpoint__save_best=False,
        training__max_grad_norm=1.0,
    )
    train(_text_cfg(tmp_path / "a", text_data, data__batch_size=2, training__gradient_accumulation_steps=2, **common))
    train(_text_cfg(tmp_path / "b", text_data, data__batch_size=4, training__gradient_accumulation_steps=1, **common))
    a = ckpt.list_checkpoints(tmp_path / "a")[-1]
    b = ckpt.list_checkpoints(tmp_path / "b")[-1]
    assert json.loads((a / "training_state/trainer_state.json").read_text())["optimizer_step"] == 3
    assert_same_weights(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, text_data, image_data, kind):
    if kind == "text":

        def make(out):
            return _text_cfg(
                out,
                text_data,
                data__batch_size=4,
                training__num_epochs=2,
                checkpoint__save_every_steps=3,
                checkpoint__keep_last=0,
            )
    else:

        def make(out):
            return load_config(
                None,
                base_overrides(
                    out,
                    TINY_CLIP,
                    data__data_dir=str(image_data),
                    data__batch_size=4,
                    training__num_epochs=2,
                    checkpoint__save_every_steps=2,
                    checkpoint__keep_last=0,
                    data__num_workers=1,
                    data__augmentation={"color_jitter": 0.3, "rotation": 10},
                ),
            )

    full = make(tmp_path / "full")
    train(full)
    # Step 3 (text: 8 batches of 4 per epoch) and step 2 (images: 3 batches per epoch) are mid-epoch.
    step = 3 if kind == "text" else 2
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / f"checkpoint-step-{step}", resumed_dir / f"checkpoint-step-{step}")
    state = json.loads((resumed_dir / f"checkpoint-step-{step}/training_state/trainer_state.json").read_text())
    assert 0 < state["batches_done"] < (8 if kind == "text" else 3)
    train(make(resumed_dir), resume="auto")
    assert_same_weights(tmp_path / "full" / "checkpoint-epoch-2", resumed_dir / "checkpoint-epoch-2")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, text_data, monkeypatch):
    cfg = _text_cfg(tmp_path / "run", text_data, data__batch_size=8, training__num_epochs=2, checkpoint__keep_last=0)
    calls = {"n": 0}
    real_save = safestate.save_file

    def flaky_save(tensors, f, *args, **kwargs):
        calls["n"] += 1
        if "optimizer" in str(f) and calls["n"] > 2:  # the second checkpoint dies while writing its state
            real_save(tensors, f, *args, **kwargs)
            raise OSError("disk full (simulated)")
        return real_save(tensors, f, *args, **kwargs)

    monkeypatch.setattr(safestate, "save_file", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.setattr(safestate, "save_file", real_save)
    out = tmp_path / "run"
    assert (out / "checkpoint-epoch-1").is_dir()
    assert not (out / "checkpoint-epoch-2").exists()
    assert not list(out.glob(".checkpoint-*"))  # no half-written folder left behind
    # The surviving checkpoint resumes and the run finishes.
    summary = train(
        _text_cfg(out, text_data, data__batch_size=8, training__num_epochs=2, checkpoint__keep_last=0), resume="auto"
    )
    assert summary["optimizer_steps"] == 8


PLAIN_LOAD = """
import sys, json, torch
sys.modules['fulltune'] = None  # prove fulltune is not needed
import transformers as tf
path, kind = sys.argv[1], sys.argv[2]
if kind == 'text':
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path)
    logits = model(**tok(['a good film'], return_tensors='pt')).logits
else:
    from PIL import Image
    proc = tf.AutoImageProcessor.from_pretrained(path)
    model = tf.AutoModelForImageClassification.from_pretrained(path)
    logits = model(**proc(Image.new('RGB', (50, 40), (200, 60, 40)), return_tensors='pt')).logits
print(json.dumps({'shape': list(logits.shape), 'labels': model.config.id2label}))
"""


@pytest.mark.parametrize("kind", ["text", "image"])
def test_export_loads_with_plain_transformers(tmp_path, text_data, image_data, kind):
    if kind == "text":
        cfg = _text_cfg(tmp_path / "run", text_data, data__batch_size=16, training__num_epochs=1)
    else:
        cfg = load_config(
            None,
            base_overrides(
                tmp_path / "run",
                TINY_CLIP,
                data__data_dir=str(image_data),
                data__batch_size=6,
                training__num_epochs=1,
                data__num_workers=0,
            ),
        )
    train(cfg)
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "run" / "best"), kind],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 2]
    expected = {"0": "0", "1": "1"} if kind == "text" else {"0": "ants", "1": "bees"}
    assert result["labels"] == expected


def test_vit_trains_one_epoch(tmp_path, image_data):
    cfg = load_config(
        None,
        base_overrides(
            tmp_path / "run",
            TINY_VIT,
            data__data_dir=str(image_data),
            data__batch_size=4,
            training__num_epochs=1,
            data__num_workers=0,
        ),
    )
    summary = train(cfg)
    assert summary["optimizer_steps"] == 3
    assert summary["test"]["examples"] == 4
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_max_samples_caps_image_folders_and_says_so(tmp_path, image_data, text_data):
    """data.max_samples / max_eval_samples keep the seeded draw text tables get, and train.log says what was kept."""
    from fulltune.data.images import scan_split
    from fulltune.data.records import capped
    from fulltune.planning import count_examples

    overrides = dict(data__data_dir=str(image_data), data__batch_size=5, data__num_workers=0, training__num_epochs=1)
    cfg = load_config(
        None, base_overrides(tmp_path / "run", TINY_VIT, data__max_samples=5, data__max_eval_samples=3, **overrides)
    )
    assert count_examples(cfg, "image_classification")[0] == 5  # what `fulltune plan` prices
    summary = train(cfg)
    assert summary["optimizer_steps"] == 1  # 5 images in batches of 5
    run = setup(cfg)  # the same draw again
    every = scan_split(image_data / "train").samples
    assert run.data.train.folder.samples == [every[i] for i in capped(12, 5, 0)]
    assert len(run.data.val) == 3 and len(run.data.test) == 4  # the test split is never capped
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train: 5 of 12 images (data.max_samples)" in log and "val: 3 of 4 images (data.max_eval_samples)" in log
    assert "Examples: train 5, val 3, test 4" in (tmp_path / "run" / "best" / "README.md").read_text()
    uncapped = setup(_text_cfg(tmp_path / "text", text_data, data__max_samples=100))
    assert uncapped.data.info["caps"] == ["train: all 32 texts (data.max_samples 100: 32 available)"]


def test_compile_switch_trains_like_eager(tmp_path, text_data):
    """training.compile=true (torch.compile, inductor on CPU) checkpoints the plain model and matches eager."""
    common = dict(model__dropout=0.0, data__batch_size=4, training__num_epochs=1, checkpoint__save_best=False)
    train(_text_cfg(tmp_path / "eager", text_data, **common))
    train(_text_cfg(tmp_path / "compiled", text_data, training__compile=True, **common))
    assert_same_weights(tmp_path / "eager/checkpoint-epoch-1", tmp_path / "compiled/checkpoint-epoch-1", atol=1e-5)


def test_resume_on_another_thread_count_is_exact_but_for_the_count(tmp_path, text_data, monkeypatch):
    """A run stopped at step 3 with one thread and resumed with two equals, bit for bit, one run that switched from
    one thread to two after step 3 (as the thread policy does between steps): resuming adds nothing. The thread
    count itself changes the rounding (reductions split across threads add in another order), so both differ from
    a run on one thread throughout in the last bits, never in the data order, dropout masks or step counters."""
    from fulltune.speed import threads

    def make(out, count):
        cfg = dict(data__batch_size=4, training__num_epochs=1, checkpoint__save_every_steps=3, checkpoint__keep_last=0)
        return _text_cfg(out, text_data, hardware__num_threads=count, checkpoint__save_best=False, **cfg)

    before = torch.get_num_threads()
    calls = {"n": 0}

    def switch_after_step_3(watch):
        calls["n"] += 1
        if calls["n"] == 3:
            torch.set_num_threads(2)
            return "CPU threads: 1 -> 2 (switched by the test)"
        return None

    try:
        train(make(tmp_path / "one", 1))
        monkeypatch.setattr(threads.ThreadWatch, "__call__", switch_after_step_3)
        train(make(tmp_path / "switched", 1))
        monkeypatch.undo()
        assert "CPU threads: 1 -> 2" in (tmp_path / "switched" / "train.log").read_text()
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(tmp_path / "one" / "checkpoint-step-3", resumed / "checkpoint-step-3")
        train(make(resumed, 2), resume="auto")
    finally:
        torch.set_num_threads(before)
    final = "checkpoint-epoch-1"
    assert_same_weights(tmp_path / "switched" / final, resumed / final)
    assert_same_weights(tmp_path / "one" / final, resumed / final, atol=1e-6)  # rounding only
    state = [
        json.loads((d / final / "training_state/trainer_state.json").read_text()) for d in (tmp_path / "one", resumed)
    ]
    assert state[0]["optimizer_step"] == state[1]["optimizer_step"] == 8
