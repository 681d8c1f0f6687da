"""The bad-input suite: every failure a user can cause (config, data, images, checkpoints, environment, command
flags) ends in exactly one `fulltune: error:` line naming the key, file or row, a non-zero exit, no traceback, and
leaves the checkpoints of an existing run untouched. All in-process through `fulltune.cli.main`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, base_overrides, write_images, write_text_split

from fulltune.cli import main, user_error
from fulltune.files.manifest import MANIFEST, write_manifest
from fulltune.state import checkpoint as ckpt


def _overrides(out: Path, data: Path, **extra) -> list[str]:
    values = base_overrides(
        out, TINY_BERT, data__data_dir=str(data), data__text_column="sentence", data__batch_size=8, **extra
    )
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A text data folder and one finished run with checkpoints and best/, shared by every case."""
    root = tmp_path_factory.mktemp("suite")
    data = root / "text"
    data.mkdir()
    write_text_split(data / "train.tsv", 32, 0)
    write_text_split(data / "val.tsv", 8, 1)
    write_text_split(data / "test.tsv", 8, 2)
    run = root / "run"
    assert (
        main(
            [
                "train",
                *_overrides(run, data, training__num_epochs=1, checkpoint__save_every_steps=2, checkpoint__keep_last=0),
            ]
        )
        == 0
    )
    return {"root": root, "data": data, "run": run, "ckpt": ckpt.list_checkpoints(run)[-1], "best": run / "best"}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "eval-" not in str(p)
    }


def _copy_ckpt(world: dict[str, Path], tmp: Path, name: str = "best") -> Path:
    src = world["best"] if name == "best" else world["ckpt"]
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _table(tmp: Path, name: str, content: str | bytes) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return d


HEADER = "sentence\tlabel\n"
GOOD_ROWS = "".join(f"a good film {i}\t{i % 2}\n" for i in range(8))


def _train(world, tmp, *overrides: str) -> list[str]:
    return ["train", *_overrides(tmp / "out", world["data"]), *overrides]


def _train_on(tmp, data: Path, *overrides: str) -> list[str]:
    return ["train", *_overrides(tmp / "out", data), *overrides]


def _resume_damaged(damage: Callable[[Path], None]) -> Callable:
    def make(world, tmp):
        c = _copy_ckpt(world, tmp, "ckpt")
        damage(c)
        return ["train", "--resume", str(c), *_overrides(tmp / "out", world["data"])]

    return make


def _write(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda c: (c / rel).write_bytes(content)


def _truncate(rel: str) -> Callable[[Path], None]:
    return lambda c: (c / rel).write_bytes((c / rel).read_bytes()[: (c / rel).stat().st_size // 2])


def _delete(rel: str) -> Callable[[Path], None]:
    return lambda c: (c / rel).unlink()


def _legacy(c: Path) -> None:
    for f in (c / "training_state").glob("optimizer.*"):
        f.unlink()
    (c / "training_state" / "optimizer.pt").write_bytes(b"\x80\x04pickle")


def _evaluate_damaged(damage: Callable[[Path], None]) -> Callable:
    def make(world, tmp):
        c = _copy_ckpt(world, tmp)
        damage(c)
        return ["evaluate", "--checkpoint", str(c), "--data_dir", str(world["data"])]

    return make


def _predict_file(content: bytes) -> Callable:
    def make(world, tmp):
        f = tmp / "inputs.txt"
        f.write_bytes(content)
        return ["predict", "--checkpoint", str(world["best"]), "--file", str(f)]

    return make


def _images(tmp: Path, damage: Callable[[Path], None]) -> Path:
    root = tmp / "img"
    write_images(root / "train", 3, 0)
    for p in (root / "train" / "bees").iterdir():
        damage(p)
    return root


def _binary_yaml(world, tmp):
    f = tmp / "config.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    return ["train", "--config", str(f), "--data_dir", str(world["data"]), "--output_dir", str(tmp / "out")]


def _alias_bomb_yaml(world, tmp):
    """804 bytes of YAML whose aliases nest nine deep: 9**9 strings once expanded (a "billion laughs" file)."""
    lines = ["model:", "  tiny_config:", '    a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"    {name}: &{name} [{','.join(['*' + prev] * 9)}]")
    f = tmp / "config.yaml"
    f.write_text("\n".join([*lines, ""]))
    return ["train", "--config", str(f), "--data_dir", str(world["data"]), "--output_dir", str(tmp / "out")]


def _file_as_output(world, tmp):
    (tmp / "afile").write_text("x")
    return ["train", *_overrides(tmp / "afile", world["data"])]


def _under_a_file(world, tmp):
    (tmp / "afile").write_text("x")
    return ["train", *_overrides(tmp / "afile" / "run", world["data"])]


def _prepare_nonempty(world, tmp):
    write_images(tmp / "src", 4, 0)
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["prepare-images", str(tmp / "src"), "--output_dir", str(tmp / "out")]


def _prepare_too_many_classes(world, tmp):
    write_images(tmp / "src", 4, 0)
    return ["prepare-images", str(tmp / "src"), "--output_dir", str(tmp / "out"), "--num_classes", "5"]


def _other_run(world, tmp):
    shutil.copytree(world["ckpt"], tmp / "out" / world["ckpt"].name)
    return ["train", *_overrides(tmp / "out", world["data"])]


def _tiny_images_run(root: Path, tmp: Path) -> list[str]:
    from conftest import TINY_VIT

    values = base_overrides(tmp / "out", TINY_VIT, data__data_dir=str(root), data__num_workers=0)
    return ["train", *[f"{k}={json.dumps(v)}" for k, v in values.items()]]


def _tiny(**changes) -> Callable:
    return lambda w, t: _train(w, t, f"model.tiny_config={json.dumps({**TINY_BERT, **changes})}")


def _image_size(size: int) -> Callable:
    def make(world, tmp):
        write_images(tmp / "img" / "train", 3, 0)
        return [*_tiny_images_run(tmp / "img", tmp), f"data.image_size={size}"]

    return make


def _model_folder(world: dict[str, Path], tmp: Path, damage: Callable[[Path], None], manifest: bool) -> Path:
    """A copy of best/ damaged; without a manifest (a folder made by hand or by another tool), or with one
    rewritten to agree with the damage (a planted folder)."""
    c = _copy_ckpt(world, tmp)
    (c / MANIFEST).unlink()
    damage(c)
    if manifest:
        write_manifest(c)
    return c


def _evaluate_folder(damage: Callable[[Path], None], manifest: bool = False) -> Callable:
    return lambda w, t: [
        "evaluate",
        "--checkpoint",
        str(_model_folder(w, t, damage, manifest)),
        "--data_dir",
        str(w["data"]),
    ]


def _export_folder(damage: Callable[[Path], None]) -> Callable:
    return lambda w, t: ["export", str(_model_folder(w, t, damage, False)), "--output_dir", str(t / "exported")]


def _train_from_folder(damage: Callable[[Path], None]) -> Callable:
    def make(world, tmp):
        folder = _model_folder(world, tmp, damage, False)
        return _train(world, tmp, f"model.name_or_path={json.dumps(str(folder))}", "model.tiny_config=null")

    return make


def _header(header: bytes) -> Callable[[Path], None]:
    """model.safetensors replaced by a header (and 64 bytes of data) as written."""
    return lambda c: (c / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))


def _edit_config(**changes) -> Callable[[Path], None]:
    return lambda c: (c / "config.json").write_text(json.dumps(json.loads((c / "config.json").read_text()) | changes))


def _only_pickle(c: Path) -> None:
    (c / "model.safetensors").unlink()
    (c / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _dataset_script(world, tmp):
    d = tmp / "mydata"
    d.mkdir()
    (d / "mydata.py").write_text("import datasets\n")
    (d / "train.csv").write_text("sentence,label\na,0\nb,1\n")
    return _train(world, tmp, f"data.dataset_name={json.dumps(str(d))}")


NESTED = b'{"a":' * 100 + b"1" + b"}" * 100
NO_OFFSETS = b'{"w": {"dtype": "F32", "shape": [1]}}'
INFINITE_OFFSET = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}'
CUSTOM_CODE = {"model_type": "my_bert", "auto_map": {"AutoConfig": "modeling_my_bert.MyConfig"}}
HUB_KERNEL = {"attn_implementation": "kernels-community/flash-attn"}


CASES: dict[str, tuple[Callable, int, tuple[str, ...]]] = {
    # ---- config values (checked at load, before any folder is made)
    "log_every_steps=0": (lambda w, t: _train(w, t, "logging.log_every_steps=0"), 2, ("logging.log_every_steps", "0")),
    "eval_batch_size=-1": (lambda w, t: _train(w, t, "data.eval_batch_size=-1"), 2, ("data.eval_batch_size", "-1")),
    "metric=f1": (lambda w, t: _train(w, t, "training.metric=f1"), 2, ("training.metric", "f1", "macro_f1")),
    "perplexity for a classifier": (
        lambda w, t: _train(w, t, "training.metric=perplexity"),
        2,
        ("training.metric", "perplexity", "text_classification"),
    ),
    "num_threads=-1": (lambda w, t: _train(w, t, "hardware.num_threads=-1"), 2, ("hardware.num_threads",)),
    "adam_beta1=2": (lambda w, t: _train(w, t, "training.adam_beta1=2"), 2, ("training.adam_beta1", "[0, 1)")),
    "adam_beta2=1": (lambda w, t: _train(w, t, "training.adam_beta2=1"), 2, ("training.adam_beta2",)),
    "adam_epsilon=-1": (lambda w, t: _train(w, t, "training.adam_epsilon=-1"), 2, ("training.adam_epsilon", "> 0")),
    "max_steps=-5": (lambda w, t: _train(w, t, "training.max_steps=-5"), 2, ("training.max_steps", "-5")),
    "max_samples=-1": (lambda w, t: _train(w, t, "data.max_samples=-1"), 2, ("data.max_samples",)),
    "weight_decay<0": (lambda w, t: _train(w, t, "training.weight_decay=-0.1"), 2, ("training.weight_decay",)),
    "warmup_steps<0": (lambda w, t: _train(w, t, "training.warmup_steps=-1"), 2, ("training.warmup_steps",)),
    "min_delta<0": (lambda w, t: _train(w, t, "training.early_stopping.min_delta=-1"), 2, ("min_delta",)),
    "min_lr_ratio=5": (lambda w, t: _train(w, t, "training.min_lr_ratio=5"), 2, ("training.min_lr_ratio", "[0, 1]")),
    "max_eval_samples=0": (lambda w, t: _train(w, t, "data.max_eval_samples=0"), 2, ("data.max_eval_samples",)),
    "keep_last=-1": (lambda w, t: _train(w, t, "checkpoint.keep_last=-1"), 2, ("checkpoint.keep_last",)),
    "lora.r=0": (lambda w, t: _train(w, t, "method.lora.r=0"), 2, ("method.lora.r",)),
    "rotation=400": (lambda w, t: _train(w, t, "data.augmentation.rotation=400"), 2, ("rotation",)),
    "learning_rate=nan": (lambda w, t: _train(w, t, "training.base_learning_rate=nan"), 2, ("base_learning_rate",)),
    "encoding=nope": (lambda w, t: _train(w, t, "data.encoding=nope"), 2, ("data.encoding", "nope")),
    "num_epochs=many": (lambda w, t: _train(w, t, "training.num_epochs=many"), 2, ("training.num_epochs",)),
    "unknown key": (lambda w, t: _train(w, t, "training.learning_rat=1"), 2, ("training.learning_rat",)),
    "binary yaml": (_binary_yaml, 2, ("config.yaml",)),
    "yaml alias bomb": (_alias_bomb_yaml, 2, ("config.yaml", "expands to over", "aliases")),
    "missing config": (lambda w, t: ["train", "--config", str(t / "nope.yaml")], 2, ("nope.yaml", "does not exist")),
    # ---- data tables
    "ragged tsv": (
        lambda w, t: _train_on(t, _table(t, "train.tsv", HEADER + GOOD_ROWS + "a\tfilm\t1\n")),
        1,
        ("train.tsv", "row 9", "line 10", "3 fields", "header has 2"),
    ),
    "ragged csv": (
        lambda w, t: _train_on(t, _table(t, "train.csv", "sentence,label\nok,1\nbad,1,2\n")),
        1,
        ("train.csv", "row 2", "line 3", "3 fields"),
    ),
    "unterminated quote": (
        lambda w, t: _train_on(t, _table(t, "train.csv", 'sentence,label\n"open,1\n')),
        1,
        ("train.csv",),
    ),
    "latin-1 bytes": (
        lambda w, t: _train_on(t, _table(t, "train.tsv", (HEADER + "caf\xe9 ok\t1\n").encode("latin-1"))),
        1,
        ("train.tsv", "byte offset 18", "data.encoding"),
    ),
    "jsonl bool+number labels": (
        lambda w, t: _train_on(
            t, _table(t, "train.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": true}\n')
        ),
        1,
        ("train.jsonl", "line 2", "booleans and numbers"),
    ),
    "jsonl null label": (
        lambda w, t: _train_on(t, _table(t, "train.jsonl", '{"sentence": "a", "label": null}\n')),
        1,
        ("train.jsonl", "line 1", "null"),
    ),
    "jsonl list label": (  # a list is a label set: multi-label, which needs two labels at least
        lambda w, t: _train_on(t, _table(t, "train.jsonl", '{"sentence": "a", "label": [1]}\n')),
        1,
        ("train.jsonl", "1 label", "multi-label"),
    ),
    "jsonl not an object": (
        lambda w, t: _train_on(t, _table(t, "train.jsonl", '{"sentence": "a", "label": 1}\n[1]\n')),
        1,
        ("train.jsonl", "line 2", "JSON object"),
    ),
    "jsonl bad json": (
        lambda w, t: _train_on(t, _table(t, "train.jsonl", '{"sentence": "a",\n')),
        1,
        ("train.jsonl", "line 1", "not valid JSON"),
    ),
    "jsonl text is a number": (
        lambda w, t: _train_on(t, _table(t, "train.jsonl", '{"sentence": 5, "label": 1}\n')),
        1,
        ("train.jsonl", "row 1", "int"),
    ),
    "empty label": (
        lambda w, t: _train_on(t, _table(t, "train.tsv", HEADER + "good\t1\nfine\t\n")),
        1,
        ("train.tsv", "row 2", "line 3", "empty label"),
    ),
    "empty text": (
        lambda w, t: _train_on(t, _table(t, "train.tsv", HEADER + "good\t1\n \t0\n")),
        1,
        ("train.tsv", "row 2", "empty text"),
    ),
    "header only": (lambda w, t: _train_on(t, _table(t, "train.tsv", HEADER)), 1, ("train.tsv", "no rows")),
    "missing column": (lambda w, t: _train(w, t, "data.label_column=sentiment"), 1, ("sentiment", "data.label_column")),
    "missing data folder": (lambda w, t: _train_on(t, t / "nope"), 1, ("nope", "does not exist")),
    # ---- images
    "only truncated jpegs": (
        lambda w, t: _tiny_images_run(_images(t, lambda p: p.write_bytes(p.read_bytes()[:200])), t),
        1,
        ("bees", "no readable images"),
    ),
    "only zero-byte images": (
        lambda w, t: _tiny_images_run(_images(t, lambda p: p.write_bytes(b"")), t),
        1,
        ("bees", "no readable images"),
    ),
    "prepare-images into a non-empty folder": (_prepare_nonempty, 2, ("files fulltune did not write", "keep.txt")),
    "prepare-images --num_classes 5": (_prepare_too_many_classes, 1, ("--num_classes 5", "only 2 classes")),
    # ---- checkpoints
    "truncated model.safetensors": (_resume_damaged(_truncate("model.safetensors")), 2, ("model.safetensors",)),
    "garbage optimizer state": (
        _resume_damaged(_write("training_state/optimizer.json", b"\x00garbage")),
        2,
        ("optimizer.json",),
    ),
    "garbage optimizer tensors": (
        _resume_damaged(_write("training_state/optimizer.safetensors", b"garbage")),
        2,
        ("optimizer.safetensors",),
    ),
    "missing rng file": (_resume_damaged(_delete("training_state/rng.json")), 2, ("rng.json", "missing")),
    "garbage trainer_state.json": (
        _resume_damaged(_write("training_state/trainer_state.json", b"{oops")),
        2,
        ("trainer_state.json",),
    ),
    "garbage fulltune_run.json (resume)": (
        _resume_damaged(_write("fulltune_run.json", b"\xff\xfe")),
        2,
        ("fulltune_run.json",),
    ),
    "missing manifest": (_resume_damaged(_delete(MANIFEST)), 2, (MANIFEST, "missing")),
    "legacy pickled optimizer.pt": (_resume_damaged(_legacy), 2, ("optimizer.pt", "pickle")),
    "resume a folder that is no checkpoint": (lambda w, t: _train(w, t, "--resume", str(t)), 2, ("--resume",)),
    "evaluate a truncated best/": (_evaluate_damaged(_truncate("model.safetensors")), 2, ("model.safetensors",)),
    "evaluate a garbage fulltune_run.json": (
        _evaluate_damaged(_write("fulltune_run.json", b"[1, 2")),
        2,
        ("fulltune_run.json",),
    ),
    "evaluate no checkpoint": (lambda w, t: ["evaluate", "--checkpoint", str(t / "nope")], 2, ("nope",)),
    # ---- command flags and environment
    "evaluate --split nope": (
        lambda w, t: ["evaluate", "--checkpoint", str(w["best"]), "--data_dir", str(w["data"]), "--split", "nope"],
        2,
        ("--split 'nope'", "dev"),
    ),
    "evaluate --batch_size 0": (
        lambda w, t: ["evaluate", "--checkpoint", str(w["best"]), "--data_dir", str(w["data"]), "--batch_size", "0"],
        2,
        ("--batch_size",),
    ),
    "predict --top_k -1": (
        lambda w, t: ["predict", "--checkpoint", str(w["best"]), "--text", "hi", "--top_k", "-1"],
        1,
        ("--top_k",),
    ),
    "predict --file not UTF-8": (_predict_file(b"caf\xe9\n"), 1, ("inputs.txt", "byte offset 3")),
    "predict --file empty": (_predict_file(b"\n\n"), 1, ("inputs.txt", "empty")),
    "predict missing file": (
        lambda w, t: ["predict", "--checkpoint", str(w["best"]), "--file", str(t / "x.txt")],
        1,
        ("x.txt", "does not exist"),
    ),
    "output_dir is a file": (_file_as_output, 2, ("afile", "is a file")),
    "output_dir under a file": (_under_a_file, 1, ("afile",)),
    "output_dir not permitted": (
        lambda w, t: _train(w, t, f"output_dir={json.dumps('/sys/fulltune-test-run')}"),
        1,
        ("/sys/fulltune-test-run",),
    ),
    "another run's folder": (_other_run, 2, ("--resume auto", "--output_dir", "--overwrite")),
}
CASES.update(
    {
        # ---- what the model can take: lengths, sizes, devices, encodings
        "max_length above the position table": (
            lambda w, t: _train(w, t, "data.max_length=1024"),
            2,
            ("data.max_length", "1024", "holds 128"),
        ),
        "tiny_config model_type unknown": (_tiny(model_type="bret"), 2, ("model.tiny_config.model_type", "bert")),
        "tiny_config hidden_size<0": (_tiny(hidden_size=-32), 2, ("model.tiny_config.hidden_size", "-32")),
        "tiny_config heads do not split": (_tiny(num_attention_heads=3), 2, ("num_attention_heads", "hidden_size 32")),
        "tiny_config vocab below the tokenizer's": (_tiny(vocab_size=10), 2, ("vocab_size", "10 rows", "30522")),
        "encoding=rot13": (lambda w, t: _train(w, t, "data.encoding=rot13"), 2, ("data.encoding", "not a text")),
        "encoding=base64": (lambda w, t: _train(w, t, "data.encoding=base64"), 2, ("data.encoding", "base64")),
        "device=tpu": (lambda w, t: _train(w, t, "hardware.device=tpu"), 2, ("hardware.device", "'tpu'", "cpu")),
        "device=meta": (lambda w, t: _train(w, t, "hardware.device=meta"), 2, ("hardware.device", "'meta'")),
        "device empty": (lambda w, t: _train(w, t, 'hardware.device=""'), 2, ("hardware.device", "''")),
        "evaluate --device tpu": (
            lambda w, t: ["evaluate", "--checkpoint", str(w["best"]), "--device", "tpu"],
            2,
            ("--device", "'tpu'"),
        ),
        "image_size=1 on a 32-px ViT": (_image_size(1), 2, ("data.image_size", "32-px")),
        "image_size=5000 on a 32-px ViT": (_image_size(5000), 2, ("data.image_size", "5000", "set it to 32")),
        # ---- model folders without a manifest (made by hand or another tool), or with one that agrees with damage
        "no manifest, truncated weights": (_evaluate_folder(_truncate("model.safetensors")), 2, ("truncated",)),
        "no manifest, config.json not JSON": (_evaluate_folder(_write("config.json", b"{")), 2, ("config.json",)),
        "no manifest, tokenizer.json not JSON": (
            _evaluate_folder(_write("tokenizer.json", b"{")),
            2,
            ("tokenizer.json",),
        ),
        "no manifest, run record not JSON": (_evaluate_folder(_write("fulltune_run.json", b"{")), 2, ("fulltune_run",)),
        "export, no manifest, run record not JSON": (
            _export_folder(_write("fulltune_run.json", b"{")),
            2,
            ("export", "fulltune_run.json", "not JSON"),
        ),
        "export, no manifest, truncated weights": (_export_folder(_truncate("model.safetensors")), 2, ("truncated",)),
        "export, no manifest, config.json not JSON": (_export_folder(_write("config.json", b"[")), 2, ("config.json",)),
        "base model truncated": (_train_from_folder(_truncate("model.safetensors")), 2, ("model.name_or_path",)),
        "base model tokenizer.json not JSON": (
            _train_from_folder(_write("tokenizer.json", b"{")),
            2,
            ("model.name_or_path", "tokenizer.json"),
        ),
        "safetensors header nested deep": (_evaluate_folder(_header(NESTED)), 2, ("model.safetensors",)),
        "safetensors header nested deep, listed": (_evaluate_folder(_header(NESTED), True), 2, ("data_offsets",)),
        "safetensors header without data_offsets": (_evaluate_folder(_header(NO_OFFSETS), True), 2, ("'w'",)),
        "safetensors infinite offset": (_evaluate_folder(_header(INFINITE_OFFSET), True), 2, ("data_offsets",)),
        "safetensors infinite offset, unlisted": (_evaluate_folder(_header(INFINITE_OFFSET)), 2, ("safetensors",)),
        "evaluate a folder of pytorch_model.bin": (_evaluate_folder(_only_pickle), 2, ("pytorch_model.bin",)),
        "evaluate custom code (auto_map)": (_evaluate_folder(_edit_config(**CUSTOM_CODE)), 2, ("auto_map", "my_bert")),
        "base model custom code (auto_map)": (
            _train_from_folder(_edit_config(**CUSTOM_CODE)),
            2,
            ("model.name_or_path", "auto_map", "model.trust_remote_code"),
        ),
        "base model naming a hub kernel": (
            _train_from_folder(_edit_config(**HUB_KERNEL)),
            2,
            ("model.name_or_path", "attn_implementation", "kernels-community/flash-attn"),
        ),
        "evaluate a folder naming a hub kernel": (_evaluate_folder(_edit_config(**HUB_KERNEL)), 2, ("kernels",)),
        "dataset folder with a loading script": (_dataset_script, 1, ("data.dataset_name", "mydata.py", "script")),
    }
)
if not torch.backends.mps.is_available():
    CASES["device mps without MPS"] = (lambda w, t: _train(w, t, "hardware.device=mps"), 2, ("hardware.device", "mps"))
if not torch.cuda.is_available():
    CASES["training.fp16 without CUDA"] = (lambda w, t: _train(w, t, "training.fp16=true"), 2, ("fp16", "CUDA"))
    CASES["device cuda without CUDA"] = (lambda w, t: _train(w, t, "hardware.device=cuda"), 2, ("cuda", "CUDA"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    make, code, needles = CASES[name]
    argv = make(world, tmp_path)
    before = _fingerprint(world["run"])
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fulltune: error:")]
    assert got == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _fingerprint(world["run"]) == before  # the existing run's checkpoints are untouched
    if name.startswith(
        ("log_every", "binary yaml", "yaml alias", "adam", "metric", "encoding=", "device", "tiny_config hidden")
    ):
        assert not (tmp_path / "out").exists()  # config errors come before any folder is made
    if name.startswith("export,"):
        assert not list(tmp_path.glob("*exported*"))  # a source that does not load leaves no export behind


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match="log_every_steps"):
        main(["--debug", *_train(world, tmp_path, "logging.log_every_steps=0")])


def test_environment_errors_are_one_line():
    """ENOSPC, EACCES, EROFS, ENOTDIR, EEXIST as the OS raises them: one message naming the path."""
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        err = OSError(code, os.strerror(code), "/data/run/checkpoint-step-4/model.safetensors")
        message, exit_code = user_error(err)
        assert exit_code == 1 and os.strerror(code) in message and "checkpoint-step-4/model.safetensors" in message
    assert user_error(KeyError("x")) is None  # a bug keeps its traceback


def test_a_full_disk_inside_safetensors_is_one_line(world, tmp_path, capsys, monkeypatch):
    """ENOSPC raised by safetensors' writer (a SafetensorError, not an OSError) during a checkpoint save and an
    export: the same one line as any full disk, naming the folder being written; nothing half-written is left."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    for argv, folder in (
        (["export", str(world["run"]), "--output_dir", str(tmp_path / "exp")], "exp"),
        (_train(world, tmp_path, "training.max_steps=1"), "/out/"),  # best/ or a checkpoint, whichever is first
    ):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("fulltune: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "No space left on device" in lines[0] and folder in lines[0], lines[0]
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.tmp-*"))
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(_train(world, tmp_path, f"output_dir={json.dumps(str(ro / 'run'))}")) == 1
        assert "permission denied" in capsys.readouterr().err.lower()
    finally:
        ro.chmod(0o700)


def test_bad_images_are_skipped_and_counted_in_train_evaluate_predict(tmp_path, capsys):
    """A truncated JPEG, a zero-byte file and a decompression bomb among good images: train, evaluate and predict
    each skip them and say so; nothing dies."""
    from PIL import Image

    root = tmp_path / "img"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_images(root / split, n, 0)
        d = root / split / "ants"
        good = next(d.glob("*.jpeg"))
        (d / "truncated.jpeg").write_bytes(good.read_bytes()[:-300])
        (d / "empty.png").write_bytes(b"")
        Image.new("1", (30000, 30000)).save(d / "bomb.png", optimize=True)
        _broken_stream_png(next(d.glob("*.png")), d / "broken_stream.png")
    args = _tiny_images_run(root, tmp_path)
    assert main([*args, "training.num_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped unreadable image") >= 3 and "bomb.png" in out and "truncated.jpeg" in out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "out" / "best"), "--data_dir", str(root)]) == 0
    assert main(["predict", "--checkpoint", str(tmp_path / "out" / "best"), "--image", str(root / "test")]) == 0
    printed = capsys.readouterr()
    assert "bomb.png" in printed.err and "truncated.jpeg" in printed.err and "broken_stream.png" in printed.err
    assert len([ln for ln in printed.out.splitlines() if ln.startswith('{"input"')]) == 4
    # evaluation never scores another image in place of one that fails to decode: skipped and counted
    evaluated = tmp_path / "out" / "eval" / "best-test"
    rows = [json.loads(ln) for ln in (evaluated / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any("broken_stream" in str(r) for r in rows)
    assert all(Path(r["input"]).parent.name == r["label"] for r in rows)
    assert json.loads((evaluated / "metrics.json").read_text())["examples"] == 4


def _broken_stream_png(good: Path, out: Path) -> None:
    """A PNG whose header parses and whose end marker is there (the cheap check passes) but whose pixel data is
    zeroed: it fails only when decoded."""
    data = bytearray(good.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 24] = bytes(24)
    out.write_bytes(bytes(data))


def test_case_count():
    assert len(CASES) >= 50
