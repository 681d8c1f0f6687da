"""`data.streaming`, causal LM from `data.dataset_name`, and `evaluate` / `predict` on a dataset split: a stream in
order gives the map-style examples; a seeded stream is reproducible and resumes bit-identically (one pass per
epoch, and passes that follow each other when the length is unknown); LM rows pack into the local readers' blocks;
evaluation from a dataset split gives the metrics of the equivalent file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_hf_datasets
import torch
from conftest import TINY_BERT, TINY_LLAMA, base_overrides
from test_train import assert_same_weights

from fulltune.config import ConfigError, load_config
from fulltune.data import text as txt
from fulltune.training.trainer import setup, train


def copy_checkpoint(run: Path, step: int, out: Path) -> Path:
    """A fresh run folder `out` holding only `run`'s checkpoint-step-`step` (what a resume finds after a kill)."""
    out.mkdir()
    shutil.copytree(run / f"checkpoint-step-{step}", out / f"checkpoint-step-{step}")
    return out


def assert_resume_is_exact(cfg: Callable[[Path], Any], tmp_path: Path, at: int, end: int) -> None:
    """A run to step `end`, and one resumed from its step-`at` checkpoint, end with identical weights."""
    train(cfg(tmp_path / "run"))
    resumed = copy_checkpoint(tmp_path / "run", at, tmp_path / "resumed")
    train(cfg(resumed), resume="auto")
    assert_same_weights(tmp_path / "run" / f"checkpoint-step-{end}", resumed / f"checkpoint-step-{end}")


datasets = pytest.importorskip("datasets")
STREAM = {"data__streaming": True}
sst2_pair = test_hf_datasets.sst2_pair  # a fixture: 300 + 60 SST-2 rows as TSV files and as a save_to_disk folder


def _text_cfg(out: Path, source: dict, **extra):
    """The tiny BERT on SST-2 rows: batches of 16, 4 steps, a checkpoint every 2."""
    values = dict(data__text_column="sentence", data__batch_size=16, training__num_epochs=1, training__max_steps=4)
    values |= dict(checkpoint__save_every_steps=2, checkpoint__keep_last=0)
    return load_config(None, base_overrides(out, TINY_BERT, **(values | source | extra)))


def _streamed(run, epoch: int = 0) -> list[dict]:
    """The examples of one epoch of a streamed run, in its batch order."""
    run.sampler.set_epoch(epoch)
    return [item for batch in run.data.train for item in batch]


def _ids(items: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(it["input_ids"].tolist()) for it in items]


def test_stream_in_order_gives_the_map_style_examples(tmp_path, sst2_pair):
    _, hub = sst2_pair
    plain = setup(_text_cfg(tmp_path / "a", {"data__dataset_name": str(hub)}))
    streamed = setup(_text_cfg(tmp_path / "b", {"data__dataset_name": str(hub)}, **STREAM, data__shuffle_buffer=0))
    assert len(streamed.sampler) == 19  # 300 rows (known from the saved split) in batches of 16: one pass an epoch
    items = _streamed(streamed)
    assert _ids(items) == [tuple(x.tolist()) for x in plain.data.train.input_ids]
    assert [it["labels"] for it in items] == plain.data.train.labels
    assert _ids(list(streamed.data.val)) == [tuple(x.tolist()) for x in plain.data.val.input_ids]

    # Only a train split: the hash hold-out carves the same validation examples; the length is then unknown.
    only_train = tmp_path / "only_train"
    datasets.load_from_disk(str(hub))["train"].save_to_disk(str(only_train))
    src = {"data__dataset_name": str(only_train)}
    plain = setup(_text_cfg(tmp_path / "c", src))
    streamed = setup(_text_cfg(tmp_path / "d", src, **STREAM, data__shuffle_buffer=0))
    assert plain.data.info["val_source"] == streamed.data.info["val_source"]
    assert _ids(list(streamed.data.val)) == [tuple(x.tolist()) for x in plain.data.val.input_ids]
    n = len(plain.data.train)
    assert len(streamed.sampler) == 4 and _ids(_streamed(streamed)) == [
        tuple(x.tolist()) for x in plain.data.train.input_ids[:64]
    ]  # max_steps=4 batches of 16, from a stream of n examples
    assert 240 < n < 300
    with pytest.raises(ConfigError, match=r"length of the training stream .* is not known .* set training.max_steps"):
        setup(_text_cfg(tmp_path / "e", src, **STREAM, training__max_steps=None))


def test_seeded_stream_is_reproducible_and_resumes_bit_identically(tmp_path, sst2_pair):
    _, hub = sst2_pair
    src = {"data__dataset_name": str(hub)}
    a = setup(_text_cfg(tmp_path / "a", src, **STREAM, data__shuffle_buffer=64))
    b = setup(_text_cfg(tmp_path / "b", src, **STREAM, data__shuffle_buffer=64))
    in_order = setup(_text_cfg(tmp_path / "c", src, **STREAM, data__shuffle_buffer=0))
    first = _ids(_streamed(a, 0))
    assert first == _ids(_streamed(b, 0))  # the same seed, the same order
    assert first != _ids(_streamed(in_order, 0)) and sorted(first) == sorted(_ids(_streamed(in_order, 0)))
    assert first != _ids(_streamed(a, 1)) and sorted(first) == sorted(_ids(_streamed(a, 1)))  # reshuffled per epoch

    train(_text_cfg(tmp_path / "run1", src, **STREAM, data__shuffle_buffer=64))
    train(_text_cfg(tmp_path / "run2", src, **STREAM, data__shuffle_buffer=64))
    assert_same_weights(tmp_path / "run1" / "checkpoint-step-4", tmp_path / "run2" / "checkpoint-step-4")
    resumed = copy_checkpoint(tmp_path / "run1", 2, tmp_path / "resumed")
    state = json.loads((resumed / "checkpoint-step-2/training_state/trainer_state.json").read_text())
    assert state["batches_done"] == 2 and state["epoch"] == 0  # mid-epoch
    train(_text_cfg(resumed, src, **STREAM, data__shuffle_buffer=64), resume="auto")
    assert_same_weights(tmp_path / "run1" / "checkpoint-step-4", resumed / "checkpoint-step-4")


def test_builder_stream_of_unknown_length_runs_passes_and_resumes(tmp_path, text_data, monkeypatch):
    """A json builder streamed has no size: the run is max_steps=6 batches of 12 over 32 rows, passes following
    each other (each reshuffled); a resume skips a whole pass and part of the next."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    files = {}
    for split in ("train", "val"):
        rows = [dict(zip(("sentence", "label"), line.split("\t"), strict=True)) for line in
                (text_data / f"{split}.tsv").read_text().splitlines()[1:]]  # fmt: skip
        files[split if split == "train" else "validation"] = str(tmp_path / f"{split}.jsonl")
        Path(files[split if split == "train" else "validation"]).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(out: Path, **extra):
        values = dict(data__dataset_name="json", data__data_files=files, data__text_column="sentence")
        values |= dict(data__batch_size=12, training__max_steps=6, checkpoint__save_every_steps=3, **STREAM)
        values |= dict(data__shuffle_buffer=8, checkpoint__keep_last=0, training__num_epochs=1)
        return load_config(None, base_overrides(out, TINY_BERT, **(values | extra)))

    run = setup(cfg(tmp_path / "a"))
    assert len(run.sampler) == 6 and run.data.labels == ["0", "1"]
    items = _streamed(run)
    assert len(items) == 72  # 32 rows: passes 0 and 1 whole, 8 rows of pass 2
    assert sorted(_ids(items[:32])) == sorted(_ids(items[32:64])) and _ids(items[:32]) != _ids(items[32:64])
    with pytest.raises(ConfigError, match="set training.max_steps"):
        setup(cfg(tmp_path / "b", training__max_steps=None))

    assert_resume_is_exact(cfg, tmp_path, at=3, end=6)  # 36 examples skipped: one pass and 4 of the next


@pytest.fixture
def shakespeare(tmp_path, shared_data) -> dict[str, Path]:
    """The first 12,000 characters of tiny Shakespeare: as a text file and a one-row dataset, and as paragraph
    records (a JSONL file and a dataset with train/validation splits)."""
    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")[:12_000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out = {"txt": tmp_path / "corpus.txt", "jsonl": tmp_path / "corpus.jsonl"}
    out["txt"].write_text(text, encoding="utf-8")
    out["jsonl"].write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    out["whole"], out["rows"] = tmp_path / "whole_hub", tmp_path / "rows_hub"
    datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(out["whole"]))
    cut = len(paragraphs) * 3 // 4
    parts = {"train": paragraphs, "validation": paragraphs[cut:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(
        str(out["rows"])
    )
    return out


def _lm_cfg(out: Path, **extra):
    values = dict(data__seq_len=32, data__batch_size=4, training__max_steps=4, training__num_epochs=1)
    values |= dict(checkpoint__save_every_steps=2, checkpoint__keep_last=0)
    return load_config(None, base_overrides(out, TINY_LLAMA, **(values | extra)))


def test_causal_lm_from_a_dataset_packs_the_local_readers_blocks_and_streams_them(tmp_path, shakespeare):
    s = shakespeare
    from_txt = setup(_lm_cfg(tmp_path / "a", task="causal_lm", data__train_file=str(s["txt"])))
    whole = setup(_lm_cfg(tmp_path / "b", data__dataset_name=str(s["whole"])))
    assert whole.task_name == "causal_lm"  # a text column and no label column
    assert torch.equal(from_txt.data.train.input_ids, whole.data.train.input_ids)
    assert torch.equal(from_txt.data.train.labels, whole.data.train.labels)

    from_jsonl = setup(_lm_cfg(tmp_path / "c", task="causal_lm", data__train_file=str(s["jsonl"])))
    rows = setup(_lm_cfg(tmp_path / "d", data__dataset_name=str(s["rows"])))
    assert len(rows.data.train) > 40 and rows.data.val is not None
    assert torch.equal(from_jsonl.data.train.input_ids, rows.data.train.input_ids)
    assert torch.equal(from_jsonl.data.train.labels, rows.data.train.labels)

    streamed = setup(_lm_cfg(tmp_path / "e", data__dataset_name=str(s["rows"]), **STREAM, data__shuffle_buffer=0))
    blocks = _streamed(streamed)  # max_steps=4 batches of 4 blocks
    assert len(blocks) == 16
    assert torch.equal(torch.stack([b["input_ids"] for b in blocks]), rows.data.train.input_ids[:16])
    val = list(streamed.data.val)
    assert torch.equal(torch.stack([b["labels"] for b in val]), rows.data.val.labels)
    with pytest.raises(ConfigError, match="data.max_samples"):
        setup(_lm_cfg(tmp_path / "f", data__dataset_name=str(s["rows"]), **STREAM, data__max_samples=8))

    cfg = lambda out: _lm_cfg(out, data__dataset_name=str(s["rows"]), **STREAM, data__shuffle_buffer=16)  # noqa: E731
    assert_resume_is_exact(cfg, tmp_path, at=2, end=4)


def test_evaluate_and_predict_from_a_dataset_split_match_the_local_file(tmp_path, sst2_pair, capsys):
    from fulltune.cli import main
    from fulltune.eval.evaluate import evaluate_checkpoint

    local, hub = sst2_pair
    train(_text_cfg(tmp_path / "run", {"data__dataset_name": str(hub)}, training__max_steps=2))
    ckpt = tmp_path / "run" / "checkpoint-step-2"
    from_file = evaluate_checkpoint(ckpt, file=str(local / "val.tsv"), output_dir=tmp_path / "e1", device="cpu")
    from_run = evaluate_checkpoint(ckpt, split="val", output_dir=tmp_path / "e2", device="cpu")  # the run's dataset
    assert from_run["dataset"] == f"{hub}[validation]" and from_run["examples"] == 60
    for key in ("accuracy", "macro_f1", "loss", "confusion_matrix", "predictions"):
        assert from_file[key] == from_run[key], key
    argv = ["evaluate", "--checkpoint", str(ckpt), "--dataset_name", str(hub), "--split", "validation"]
    assert main([*argv, "--output_dir", str(tmp_path / "e3"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["accuracy"] == from_file["accuracy"]
    capsys.readouterr()
    rc = main(["predict", "--checkpoint", str(ckpt), "--dataset_name", str(hub), "--split", "validation"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 60
    texts = txt.read_examples(local / "val.tsv", load_config(None, {"data.text_column": "sentence"}).data).texts
    assert [r["input"] for r in lines] == [t.strip() for t in texts]


def test_evaluate_a_causal_lm_on_a_dataset_split_scores_the_file_of_its_rows(tmp_path, shared_data):
    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()[:40]
    # each row is one record, framed as a JSONL `text` record is (an end token after each)
    rows = "".join(json.dumps({"text": line}) + "\n" for line in lines)
    (tmp_path / "val.jsonl").write_text(rows, encoding="utf-8")
    hub = tmp_path / "wiki_hub"
    parts = {"train": lines[:30], "validation": lines}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(str(hub))
    train(_lm_cfg(tmp_path / "run", data__dataset_name=str(hub), training__max_steps=2))
    ckpt = tmp_path / "run" / "checkpoint-step-2"
    from_file = evaluate_checkpoint_lm(ckpt, tmp_path, file=str(tmp_path / "val.jsonl"))
    from_hub = evaluate_checkpoint_lm(ckpt, tmp_path, dataset_name=str(hub), split="validation")
    assert from_hub["dataset"] == f"{hub}[validation]"
    assert from_file["tokens"] == from_hub["tokens"] > 300
    assert from_file["perplexity"] == from_hub["perplexity"]


def evaluate_checkpoint_lm(ckpt: Path, tmp_path: Path, **kwargs) -> dict:
    from fulltune.eval.evaluate import evaluate_checkpoint

    out = tmp_path / ("e-" + "-".join(sorted(kwargs)))
    return evaluate_checkpoint(ckpt, output_dir=out, device="cpu", block_size=32, **kwargs)


bees_pair = test_hf_datasets.bees_pair  # a fixture: 20 + 6 hymenoptera images as folders and a save_to_disk folder


def test_image_stream_in_order_gives_the_map_style_pixels_and_resumes_bit_identically(tmp_path, bees_pair):
    from fulltune.data.sampler import sample_seed

    _, hub = bees_pair
    src = {"data__dataset_name": str(hub)}
    plain = setup(test_hf_datasets._image_cfg(tmp_path / "a", src))
    streamed = setup(test_hf_datasets._image_cfg(tmp_path / "b", src, **STREAM, data__shuffle_buffer=0))
    assert streamed.task_name == "image_classification" and len(streamed.sampler) == 5
    items = _streamed(streamed, 1)  # epoch 1: augmented with the seeds the map-style sampler gives epoch 1
    assert len(items) == 20
    for i, item in enumerate(items):
        ref = plain.data.train[(i, sample_seed(0, 1, i))]
        assert item["labels"] == ref["labels"] and torch.equal(item["pixel_values"], ref["pixel_values"])
    val = list(streamed.data.val)
    assert len(val) == 6 and all(
        torch.equal(v["pixel_values"], plain.data.val[i]["pixel_values"]) for i, v in enumerate(val)
    )
    caps = {"data__max_samples": 8, "data__max_eval_samples": 4}
    capped = setup(test_hf_datasets._image_cfg(tmp_path / "c", src, **STREAM, data__shuffle_buffer=0, **caps))
    assert len(_streamed(capped, 1)) == 8 and len(list(capped.data.val)) == 4
    assert capped.data.info["caps"] == [
        "train: the first 8 images of the stream (data.max_samples)",
        "val: the first 4 images of the stream (data.max_eval_samples)",
    ]

    cfg = lambda out: test_hf_datasets._image_cfg(out, src, **STREAM, data__shuffle_buffer=8)  # noqa: E731
    assert_resume_is_exact(cfg, tmp_path, at=2, end=4)


def test_streaming_needs_a_dataset_name_and_refuses_epoch_schedules_without_a_length(tmp_path, sst2_pair):
    with pytest.raises(ConfigError, match="data.streaming=true streams data.dataset_name"):
        load_config(None, {"data.streaming": True})
    only_train = tmp_path / "only_train"
    datasets.load_from_disk(str(sst2_pair[1]))["train"].save_to_disk(str(only_train))
    src = {"data__dataset_name": str(only_train)}
    with pytest.raises(
        ConfigError, match="progressive_unfreezing and method.head_init=linear_probe schedule by epochs"
    ):
        setup(_text_cfg(tmp_path / "a", src, **STREAM, training__progressive_unfreezing__enabled=True))
