"""`data.dataset_name`: save_to_disk folders of real text (SST-2) and images (hymenoptera) train on exactly the
examples, in exactly the order, of the equivalent local files; a mid-epoch resume is bit-identical; a builder name
with data_files reads like the local reader; bad names, splits and columns are one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_CLIP, base_overrides
from test_train import assert_same_weights

from fulltune.config import load_config
from fulltune.data import images as img
from fulltune.data.text import DataError
from fulltune.training.trainer import setup, train

datasets = pytest.importorskip("datasets")


def _tsv_rows(path: Path, n: int) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for _, row in zip(range(n), reader, strict=False)]


def _write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows), encoding="utf-8")


@pytest.fixture
def sst2_pair(tmp_path, shared_data) -> tuple[Path, Path]:
    """300 train + 60 dev rows of SST-2 as local TSV files and as a save_to_disk DatasetDict (integer labels)."""
    train = _tsv_rows(shared_data / "sst2" / "train.tsv", 300)
    val = _tsv_rows(shared_data / "sst2" / "dev.tsv", 60)
    local = tmp_path / "sst2_local"
    local.mkdir()
    _write_tsv(local / "train.tsv", train)
    _write_tsv(local / "val.tsv", val)

    def table(rows: list[dict[str, str]]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]}
        )

    hub = tmp_path / "sst2_hub"
    datasets.DatasetDict({"train": table(train), "validation": table(val)}).save_to_disk(str(hub))
    return local, hub


def _text_cfg(out: Path, source: dict, **extra):
    return load_config(
        None,
        base_overrides(
            out,
            TINY_BERT,
            data__text_column="sentence",
            data__batch_size=16,
            training__num_epochs=1,
            training__max_steps=4,
            checkpoint__save_every_steps=2,
            checkpoint__keep_last=0,
            **source,
            **extra,
        ),
    )


def test_text_dataset_matches_local_files_and_resumes_bit_identically(tmp_path, sst2_pair):
    local, hub = sst2_pair
    from_files = {"data__data_dir": str(local)}
    from_hub = {"data__dataset_name": str(hub)}
    a, b = setup(_text_cfg(tmp_path / "a", from_files)), setup(_text_cfg(tmp_path / "b", from_hub))
    assert a.task_name == b.task_name == "text_classification"
    assert a.data.labels == b.data.labels == ["0", "1"]
    for split in ("train", "val"):
        da, db = getattr(a.data, split), getattr(b.data, split)
        assert len(da) == len(db) == (300 if split == "train" else 60)
        assert da.labels == db.labels
        assert all(torch.equal(x, y) for x, y in zip(da.input_ids, db.input_ids, strict=True))
    assert a.sampler.batches(0) == b.sampler.batches(0)  # the same seeded, length-grouped order

    train(_text_cfg(tmp_path / "files", from_files))
    train(_text_cfg(tmp_path / "hub", from_hub))
    assert_same_weights(tmp_path / "files" / "checkpoint-step-4", tmp_path / "hub" / "checkpoint-step-4")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "hub" / "checkpoint-step-2", resumed / "checkpoint-step-2")
    state = json.loads((resumed / "checkpoint-step-2/training_state/trainer_state.json").read_text())
    assert 0 < state["batches_done"] < 19  # mid-epoch: 300 rows are 19 batches of 16
    train(_text_cfg(resumed, from_hub), resume="auto")
    assert_same_weights(tmp_path / "hub" / "checkpoint-step-4", resumed / "checkpoint-step-4")


@pytest.fixture
def bees_pair(tmp_path, shared_data) -> tuple[Path, Path]:
    """10 + 10 train and 3 + 3 val hymenoptera images as class folders and as a save_to_disk DatasetDict."""
    local = tmp_path / "bees_local"
    for split, n in (("train", 10), ("val", 3)):
        for cls in ("ants", "bees"):
            (local / split / cls).mkdir(parents=True)
            for p in sorted((shared_data / "hymenoptera" / split / cls).iterdir())[:n]:
                shutil.copy(p, local / split / cls / p.name)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ants", "bees"])})
    parts = {}
    for split, hub_name in (("train", "train"), ("val", "validation")):
        rows = img.scan_split(local / split).samples  # sorted by class, then file name
        parts[hub_name] = datasets.Dataset.from_dict(
            {"image": [str(p) for p, _ in rows], "label": [c for _, c in rows]}, features=features
        )
    hub = tmp_path / "bees_hub"
    datasets.DatasetDict(parts).save_to_disk(str(hub))
    return local, hub


def _image_cfg(out: Path, source: dict, **extra):
    values = dict(
        data__batch_size=4,
        training__num_epochs=1,
        training__max_steps=4,
        data__num_workers=0,
        checkpoint__save_every_steps=2,
        checkpoint__keep_last=0,
        data__augmentation={"color_jitter": 0.3},
    )
    return load_config(None, base_overrides(out, TINY_CLIP, **(values | source | extra)))


def test_image_dataset_matches_image_folders_and_resumes_bit_identically(tmp_path, bees_pair):
    local, hub = bees_pair
    from_files = {"data__data_dir": str(local)}
    from_hub = {"data__dataset_name": str(hub)}
    a, b = setup(_image_cfg(tmp_path / "a", from_files)), setup(_image_cfg(tmp_path / "b", from_hub))
    assert a.task_name == b.task_name == "image_classification"
    assert a.data.labels == b.data.labels == ["ants", "bees"]
    assert len(a.data.train) == len(b.data.train) == 20 and len(a.data.val) == len(b.data.val) == 6
    for i in (0, 7, 19):  # the same pixels, augmented with the same per-example seed
        xa, xb = a.data.train[(i, 1234 + i)], b.data.train[(i, 1234 + i)]
        assert xa["labels"] == xb["labels"] and torch.equal(xa["pixel_values"], xb["pixel_values"])
    for i in range(6):
        assert torch.equal(a.data.val[i]["pixel_values"], b.data.val[i]["pixel_values"])
    caps = {"data__max_samples": 7, "data__max_eval_samples": 4}  # the same draw from both sources
    a, b = setup(_image_cfg(tmp_path / "ca", from_files, **caps)), setup(_image_cfg(tmp_path / "cb", from_hub, **caps))
    kept = ["train: 7 of 20 images (data.max_samples)", "val: 4 of 6 images (data.max_eval_samples)"]
    assert a.data.info["caps"] == b.data.info["caps"] == kept
    for i in range(7):
        assert torch.equal(a.data.train[(i, 5 + i)]["pixel_values"], b.data.train[(i, 5 + i)]["pixel_values"])

    train(_image_cfg(tmp_path / "files", from_files))
    train(_image_cfg(tmp_path / "hub", from_hub, data__num_workers=1))  # rows travel to a worker process too
    assert_same_weights(tmp_path / "files" / "checkpoint-step-4", tmp_path / "hub" / "checkpoint-step-4")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "hub" / "checkpoint-step-2", resumed / "checkpoint-step-2")
    train(_image_cfg(resumed, from_hub), resume="auto")
    assert_same_weights(tmp_path / "hub" / "checkpoint-step-4", resumed / "checkpoint-step-4")


def test_builder_name_with_data_files_reads_like_the_local_reader(tmp_path, text_data, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split in ("train", "val"):
        rows = [
            dict(zip(("sentence", "label"), line.split("\t"), strict=True))
            for line in (text_data / f"{split}.tsv").read_text().splitlines()[1:]
        ]
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = setup(
        load_config(
            None, base_overrides(tmp_path / "a", TINY_BERT, data__data_dir=str(jsonl), data__text_column="sentence")
        )
    )
    hub = setup(
        load_config(
            None,
            base_overrides(
                tmp_path / "b",
                TINY_BERT,
                data__dataset_name="json",
                data__text_column="sentence",
                data__data_files={"train": str(jsonl / "train.jsonl"), "validation": str(jsonl / "val.jsonl")},
            ),
        )
    )
    assert files.data.labels == hub.data.labels
    assert files.data.train.labels == hub.data.train.labels and len(hub.data.val) == 8
    assert all(torch.equal(x, y) for x, y in zip(files.data.train.input_ids, hub.data.train.input_ids, strict=True))


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"data__text_column": "text"},
            r"split 'train': no column 'text' \(data.text_column\); it has: sentence, label",
        ),
        ({"data__text_column": "sentence", "data__val_split": "dev"}, r"has no split 'dev' \(data.val_split\)"),
    ],
)
def test_bad_columns_and_splits_are_one_line(tmp_path, extra, message):
    hub = tmp_path / "hub"
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}).save_to_disk(str(hub))
    with pytest.raises(DataError, match=message):
        setup(load_config(None, base_overrides(tmp_path / "run", TINY_BERT, data__dataset_name=str(hub), **extra)))


def test_missing_dataset_is_one_line(tmp_path):
    from fulltune.cli import main

    rc = main(
        [
            "train",
            "--output_dir",
            str(tmp_path / "run"),
            f"data.dataset_name={tmp_path / 'nowhere'}",
            "task=text_classification",
        ]
    )
    assert rc == 1
