"""No command deletes or mixes what it did not write. Every command that writes a folder (train, evaluate, export,
interpolate, prune, compare, demo, prepare-images, report) is pointed at (a) another command's output, (b) the parent
of two runs with a user's file beside them, (c) its own input, (d) a folder inside its input and (e) a folder of
unknown files, with and without --overwrite where it has one: the whole tree is hashed before and after, and each
refusal is one `fulltune: error:` line that names the folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_bert_train_args, write_images, write_text_split

from fulltune.cli import main
from fulltune.files.rundir import OUTPUT_RECORD, owner_of


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its content's SHA-256 ("dir" for folders)."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        found[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """data/ (a text table set), photos/ (two image classes), runs/runA and runs/runB (tiny BERT runs) with
    runs/NOTES.txt beside them, exp/ (an export of runA) and user/ (a folder of a user's own files)."""
    root = tmp_path_factory.mktemp("world")
    (root / "data").mkdir()
    for split, n, seed in (("train", 16, 0), ("val", 8, 1), ("test", 8, 2)):
        write_text_split(root / "data" / f"{split}.tsv", n, seed)
    write_images(root / "photos", 3, 0)
    for name in ("runA", "runB"):
        argv = tiny_bert_train_args(root / "data", root / "runs" / name, "training.max_steps=2")
        assert main(argv) == 0
    (root / "runs" / "NOTES.txt").write_text("my notes\n")
    assert main(["export", str(root / "runs" / "runA"), "--output_dir", str(root / "exp")]) == 0
    (root / "user").mkdir()
    (root / "user" / "thesis.tex").write_text("\\section{Results}\n")
    (root / "user" / "figures").mkdir()
    (root / "user" / "figures" / "plot.png").write_bytes(b"\x89PNG not really")
    return root


def _commands(w: Path) -> dict[str, tuple[list[str] | None, tuple[str, ...]]]:
    """command -> (argv without --output_dir, its inputs); report takes its folder as the argument."""
    run_a, best = w / "runs" / "runA", w / "runs" / "runA" / "best"
    train = tiny_bert_train_args(w / "data", w / "unused", "training.max_steps=1")
    i = train.index("--output_dir")
    del train[i : i + 2]  # each case gives its own
    return {
        "train": (train, (str(w / "data" / "train.tsv"), str(w / "data" / "val.tsv"))),  # a data folder's splits
        "evaluate": (
            ["evaluate", "--checkpoint", str(best), "--data_dir", str(w / "data")],
            (str(best), str(w / "data")),
        ),
        "export": (["export", str(run_a)], (str(run_a),)),
        "interpolate": (["interpolate", "--zeroshot", str(best), "--finetuned", str(best)], (str(best),)),
        "prune": (["prune", "--base_model", str(best), "--pruning_ratio", "0.5"], (str(best),)),
        "compare": (["compare", "--methods", "linear_probe", *train[1:]], (str(w / "data" / "train.tsv"),)),
        "demo": (["demo", "--data_only"], ()),
        "prepare-images": (["prepare-images", str(w / "photos")], (str(w / "photos"),)),
    }


OVERWRITE = {"train", "prepare-images"}
"""Commands with an --overwrite flag: each case is also tried with it."""


def _targets(w: Path, inputs: tuple[str, ...]) -> dict[str, Path]:
    targets = {
        "another command's output": w / "exp",
        "another run": w / "runs" / "runB",
        "the parent of two runs and a user's file": w / "runs",
        "a folder of unknown files": w / "user",
    }
    for source in inputs:
        targets[f"its input {Path(source).name}"] = Path(source)
        if Path(source).is_dir():
            targets[f"a folder inside its input {Path(source).name}"] = Path(source) / "sub"
        targets[f"the folder above its input {Path(source).name}"] = Path(source).parent
    return targets


@pytest.mark.parametrize(
    "command", ["train", "evaluate", "export", "interpolate", "prune", "compare", "demo", "prepare-images"]
)
def test_every_command_refuses_what_it_did_not_write(world, command, capsys):
    argv, inputs = _commands(world)[command]
    for what, target in _targets(world, inputs).items():
        if command == "export" and target == world / "exp":
            continue  # export's own earlier output: replacing it is allowed (test below)
        for extra in ([], ["--overwrite"]) if command in OVERWRITE else ([],):
            if command == "train" and target == world / "runs" / "runB" and extra:
                continue  # train's own kind of output: --overwrite replaces it (test below)
            before = _tree(world)
            code, err = _run(capsys, *argv, "--output_dir", str(target), *extra)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            assert code != 0, f"{command} into {what} ({target}) {extra}: exit 0"
            assert len(lines) == 1 and lines[0].startswith("fulltune: error:"), (command, what, err)
            assert str(target) in lines[0] or target.name in lines[0], (command, what, lines[0])
            assert _tree(world) == before, f"{command} into {what} {extra} changed the tree"


def test_report_writes_only_into_a_training_run(world, capsys):
    for target in (world / "exp", world / "runs", world / "user"):
        before = _tree(world)
        code, err = _run(capsys, "report", str(target))
        assert code == 2 and err.count("\n") == 1 and err.startswith("fulltune: error:"), err
        assert _tree(world) == before
    code, _ = _run(capsys, "report", str(world / "runs" / "runA"))
    assert code == 0 and owner_of(world / "runs" / "runA") == "train"


def test_prepare_images_never_deletes_its_source(world, capsys):
    """The photos folder inside the output folder, with --overwrite: refused before anything is removed."""
    parent = world.parent / "photos_parent"
    write_images(parent / "PHOTOS", 2, 3)
    before = _tree(parent)
    code, err = _run(capsys, "prepare-images", str(parent / "PHOTOS"), "--output_dir", str(parent), "--overwrite")
    assert code == 2 and "contains the input" in err and err.count("\n") == 1
    assert _tree(parent) == before


def test_export_to_the_parent_of_its_run_is_refused(tmp_path, text_data, capsys):
    """The reproduction: train outputs/runA, a note beside it, export outputs/runA --output_dir outputs."""
    outputs = tmp_path / "outputs"
    assert main(tiny_bert_train_args(text_data, outputs / "runA", "training.max_steps=1")) == 0
    (outputs / "NOTES.txt").write_text("notes\n")
    before = _tree(outputs)
    code, err = _run(capsys, "export", str(outputs / "runA"), "--output_dir", str(outputs))
    assert code == 2 and err.count("\n") == 1 and err.startswith("fulltune: error:"), err
    assert str(outputs) in err
    assert _tree(outputs) == before


def test_rerunning_into_its_own_output(world, tmp_path, capsys):
    """export, evaluate, prepare-images and demo --data_only replace their own earlier output; files a user put
    beside a shared output (demo) stay; files a user put inside a whole-folder output make a rerun refuse."""
    out = tmp_path / "exported"
    for _ in range(2):
        assert _run(capsys, "export", str(world / "runs" / "runA"), "--output_dir", str(out))[0] == 0
    record = json.loads((out / OUTPUT_RECORD).read_text())
    assert record["command"] == "export" and "model.safetensors" in record["files"]
    (out / "mine.txt").write_text("keep me")
    before = _tree(out)
    code, err = _run(capsys, "export", str(world / "runs" / "runA"), "--output_dir", str(out))
    assert code == 2 and "mine.txt" in err and _tree(out) == before

    ev = tmp_path / "eval"
    for _ in range(2):
        argv = ["evaluate", "--checkpoint", str(world / "runs" / "runA" / "best"), "--data_dir", str(world / "data")]
        assert _run(capsys, *argv, "--output_dir", str(ev))[0] == 0
    assert owner_of(ev) == "evaluate" and (ev / "metrics.json").is_file()

    split = tmp_path / "split"
    for extra in ([], ["--overwrite"]):
        assert _run(capsys, "prepare-images", str(world / "photos"), "--output_dir", str(split), *extra)[0] == 0
    code, err = _run(capsys, "prepare-images", str(world / "photos"), "--output_dir", str(split))
    assert code == 1 and "--overwrite" in err  # its own earlier split: replaced only when asked

    demo = tmp_path / "demo"
    assert _run(capsys, "demo", "--data_only", "--output_dir", str(demo))[0] == 0
    (demo / "NOTES.txt").write_text("mine")
    assert _run(capsys, "demo", "--data_only", "--output_dir", str(demo))[0] == 0
    assert (demo / "NOTES.txt").read_text() == "mine" and owner_of(demo) == "demo"


def test_train_overwrite_removes_only_what_the_run_wrote(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    args = tiny_bert_train_args(text_data, out, "training.max_steps=1")
    assert main(args) == 0
    assert _run(capsys, "evaluate", "--checkpoint", str(out / "best"), "--data_dir", str(text_data))[0] == 0
    (out / "eval" / "best-test" / "stale.txt").write_text("old")
    (out / "NOTES.txt").write_text("mine")
    code, err = _run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "NOTES.txt").read_text() == "mine"
    assert not (out / "eval").exists()  # the earlier run's evaluations went with it
    assert owner_of(out) == "train"
    assert len((out / "run_history.jsonl").read_text().splitlines()) == 1  # the new run's start only


def test_a_kill_mid_export_leaves_the_old_export_or_the_new(world, tmp_path):
    """FULLTUNE_KILL_AT kills the export between its two renames; the next export restores, then replaces."""
    out = tmp_path / "exported"
    assert main(["export", str(world / "runs" / "runA"), "--output_dir", str(out)]) == 0
    old = _tree(out)
    env = dict(os.environ, FULLTUNE_KILL_AT="between-renames:1")
    cmd = [sys.executable, "-m", "fulltune", "export", str(world / "runs" / "runB"), "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and any(p.name.startswith(".exported.old-") for p in tmp_path.iterdir())
    cmd[4] = str(world / "runs" / "runA")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "restored" in proc.stdout
    assert _tree(out).keys() == old.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_compare_into_a_finished_run_is_refused(world, capsys):
    before = _tree(world)
    args = tiny_bert_train_args(world / "data", world / "runs" / "runA")[1:]
    code, err = _run(capsys, "compare", "--methods", "full", *args)
    assert code == 2 and "fulltune train" in err and err.count("\n") == 1
    assert _tree(world) == before


def test_a_data_folder_may_hold_the_run_but_not_inside_a_split(tmp_path, text_data, image_data, capsys):
    """What a run reads is its data folder's split files and folders: a run folder beside them is fine (data in the
    working folder, outputs under it), one inside an image split folder is not."""
    from fulltune.config import load_config
    from fulltune.data.text import run_inputs

    assert main(tiny_bert_train_args(text_data, text_data / "outputs" / "run", "training.max_steps=1")) == 0
    cfg = load_config(None, {"data.data_dir": str(image_data)})
    assert {Path(p).name for p in run_inputs(cfg)} >= {"train", "val", "test"}
    before = _tree(image_data)
    code, err = _run(capsys, *tiny_bert_train_args(image_data, image_data / "train" / "run"))
    assert code == 2 and "lies inside the input" in err and _tree(image_data) == before


def test_a_second_process_cannot_share_a_run_folder(tmp_path, text_data, capsys):
    """While one process trains in a folder (its lock held), another `train --resume auto` there is refused and
    changes nothing; once the first has ended (the OS drops its lock, even on SIGKILL), the second goes ahead."""
    out = tmp_path / "run"
    args = tiny_bert_train_args(text_data, out, "training.max_steps=2")
    assert main(args) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from fulltune.files.rundir import _lock_run; "
         f"_lock_run(Path({str(out)!r})); print('locked', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(out)
        code, err = _run(capsys, "train", "--resume", "auto", *args[1:-1], "training.max_steps=3")
        assert code == 2 and "in use by another fulltune process" in err and f"pid {holder.pid}" in err, err
        assert err.count("\n") == 1 and _tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert _run(capsys, "train", "--resume", "auto", *args[1:-1], "training.max_steps=3")[0] == 0


def test_a_kill_mid_line_in_metrics_jsonl_costs_only_that_line(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    args = tiny_bert_train_args(text_data, out, "training.max_steps=2", "training.num_epochs=3")
    assert main(args) == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"split": "train", "step": 9, "lo')  # what a kill mid-write leaves
    assert (
        _run(capsys, "train", "--resume", "auto", *args[1:-2], "training.max_steps=3", "training.num_epochs=3")[0] == 0
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    broken = [ln for ln in lines if not ln.startswith("{") or not ln.endswith("}")]
    assert broken == ['{"split": "train", "step": 9, "lo']
    assert any(json.loads(ln).get("step") == 3 for ln in lines if ln not in broken)


def test_a_folder_with_only_pickled_weights_is_refused_everywhere(world, tmp_path, capsys):
    """export, train model.name_or_path=<folder> and prune --base_model on a folder whose weights are only a
    pytorch_model.bin: one line naming the file, and the pickle is never opened (it would write a marker)."""
    import pickle
    import shutil

    from test_trust import Payload

    folder = tmp_path / "pickled"
    shutil.copytree(world / "runs" / "runA" / "best", folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "code_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    train = tiny_bert_train_args(world / "data", tmp_path / "run", f"model.name_or_path={folder}")
    train.remove(next(a for a in train if a.startswith("model.tiny_config=")))
    for argv in (
        ["export", str(folder), "--output_dir", str(tmp_path / "exp")],
        train,
        ["prune", "--base_model", str(folder), "--output_dir", str(tmp_path / "pruned")],
    ):
        code, err = _run(capsys, *argv)
        assert code == 2 and "pytorch_model.bin" in err and err.count("\n") == 1, (argv[0], err)
    assert not marker.exists()


@pytest.mark.parametrize("point", ["record-written", "record-renamed"])
def test_a_kill_while_best_gains_its_test_metrics_leaves_best_loadable(tmp_path, text_data, capsys, point):
    """The run record of best/ is rewritten with the test metrics at the very end of a run: a SIGKILL on either side
    of its rename leaves best/ verifiable (evaluate loads it), and --resume auto ends with the same weights."""
    from safetensors.torch import load_file

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(tiny_bert_train_args(text_data, ref, "training.max_steps=2")) == 0
    argv = tiny_bert_train_args(text_data, out, "training.max_steps=2")
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune", *argv], env=dict(os.environ, FULLTUNE_KILL_AT=f"{point}:1"), timeout=300
    )
    assert proc.returncode == -9
    code, err = _run(capsys, "evaluate", "--checkpoint", str(out / "best"), "--data_dir", str(text_data))
    assert code == 0, err
    assert main(["train", "--resume", "auto", *argv[1:]]) == 0
    assert not list((out / "best").glob("*.new"))
    for name in ("model.safetensors",):
        a, b = load_file(str(ref / "best" / name)), load_file(str(out / "best" / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((out / "best" / "fulltune_run.json").read_text())["test_metrics"]


def test_a_resume_from_another_task_or_label_set_is_refused(tmp_path, text_data, capsys):
    """--resume with a checkpoint written for another model family, task or label set: one line, nothing loaded
    (before, missing weights were filled randomly and the run went on as if resumed)."""
    from conftest import TINY_LLAMA

    first = tmp_path / "first"
    assert main(tiny_bert_train_args(text_data, first, "training.max_steps=2")) == 0
    point = sorted(first.glob("checkpoint-*"))[-1]
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "train.txt").write_text("to be or not to be, that is the question\n" * 40)
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    for split in ("train", "val"):
        rows = (text_data / f"{split}.tsv").read_text().splitlines()
        (relabelled / f"{split}.tsv").write_text("\n".join([rows[0]] + [r[:-1] + "xy"[int(r[-1])] for r in rows[1:]]))
    llama = [
        "train", "--data_dir", str(lm), "--output_dir", str(tmp_path / "b"), "task=causal_lm",
        f"model.tiny_config={json.dumps(TINY_LLAMA)}", "model.tokenizer=sentence-transformers/all-MiniLM-L6-v2",
        "logging.progress_bar=false", "logging.tensorboard=false", "hardware.mixed_precision=no", "data.seq_len=16",
    ]  # fmt: skip
    for argv, needle in (
        (llama, "a different model family"),
        (tiny_bert_train_args(relabelled, tmp_path / "c", "training.max_steps=3"), "different labels"),
    ):
        code, err = _run(capsys, argv[0], "--resume", str(point), *argv[1:])
        assert code == 2 and needle in err and err.count("\n") == 1, err


def test_a_weight_file_planted_beside_a_checkpoint_is_never_read(tmp_path, text_data):
    """Two copies of a run resumed to the same end, one with a planted zz_extra.safetensors beside its newest
    checkpoint's weights (every tensor set to 7): the same final weights (only manifest-listed files are read)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fulltune.state import checkpoint as ckpt

    clean, planted = tmp_path / "clean", tmp_path / "planted"
    extra = ("training.max_steps=2", "checkpoint.save_every_steps=1", "checkpoint.keep_last=0")
    assert main(tiny_bert_train_args(text_data, clean, *extra)) == 0
    shutil.copytree(clean, planted)
    point = ckpt.list_checkpoints(planted)[0]
    weights = load_file(str(point / "model.safetensors"))
    save_file({k: v * 0 + 7 for k, v in weights.items()}, str(point / "zz_extra.safetensors"))
    for out in (clean, planted):  # both from step 1 to step 2 again
        argv = tiny_bert_train_args(text_data, out, *extra)
        assert main(["train", "--resume", str(ckpt.list_checkpoints(out)[0]), *argv[1:]]) == 0
    a = load_file(str(ckpt.list_checkpoints(clean)[-1] / "model.safetensors"))
    b = load_file(str(ckpt.list_checkpoints(planted)[-1] / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_evaluate_never_replaces_an_evaluation_of_other_data_unasked(world, tmp_path, capsys):
    """Two files with one stem evaluated in turn keep both results (the second goes to <name>-2); evaluating the
    same file again replaces its own result and says so."""
    best = tmp_path / "run" / "best"
    shutil.copytree(world / "runs" / "runA" / "best", best)
    for name, seed in (("a", 3), ("b", 4)):
        (tmp_path / name).mkdir()
        write_text_split(tmp_path / name / "test.tsv", 6 if name == "a" else 4, seed)
    for name in ("a", "b"):
        assert _run(capsys, "evaluate", "--checkpoint", str(best), "--file", str(tmp_path / name / "test.tsv"))[0] == 0
    first, second = tmp_path / "run" / "eval" / "best-test", tmp_path / "run" / "eval" / "best-test-2"
    assert json.loads((first / "metrics.json").read_text())["examples"] == 6
    assert json.loads((second / "metrics.json").read_text())["examples"] == 4
    assert json.loads((second / "metrics.json").read_text())["evaluated"]["file"] == str(tmp_path / "b" / "test.tsv")
    code, err = _run(capsys, "evaluate", "--checkpoint", str(best), "--file", str(tmp_path / "b" / "test.tsv"))
    assert code == 0 and f"replacing the earlier evaluation in {second}" in err
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == ["best-test", "best-test-2"]


def test_a_resume_on_relabelled_data_is_refused_and_a_changed_learning_rate_is_said(tmp_path, text_data, capsys):
    """Same labels, one row relabelled since the checkpoint: refused with one line naming the file (the resumed run
    could not end as the uninterrupted one). A new learning rate is allowed and said in train.log."""
    out = tmp_path / "run"
    assert main(tiny_bert_train_args(text_data, out, "training.max_steps=2", "training.num_epochs=3")) == 0
    capsys.readouterr()
    resume = tiny_bert_train_args(text_data, out, "training.max_steps=3", "training.num_epochs=3")
    changed = [*resume, "training.base_learning_rate=0.03"]
    assert main([changed[0], "--resume", "auto", *changed[1:]]) == 0
    log = (out / "train.log").read_text()
    assert "changed since the checkpoint: training.base_learning_rate: 5e-05 -> 0.03" in log, log[-2000:]
    assert "training.max_steps: 2 -> 3" in log
    rows = (text_data / "train.tsv").read_text().splitlines()
    flipped = rows[1][:-1] + ("1" if rows[1].endswith("0") else "0")
    (text_data / "train.tsv").write_text("\n".join([rows[0], flipped, *rows[2:]]) + "\n")
    more = [*resume[:-2], "training.max_steps=4", "training.num_epochs=3", "training.base_learning_rate=0.03"]
    before = _tree(out)
    code, err = _run(capsys, more[0], "--resume", "auto", *more[1:])
    assert code == 2 and "trained on other data: train.tsv changed" in err and err.count("\n") == 1, err
    assert {k: v for k, v in _tree(out).items() if "lock" not in k} == {
        k: v for k, v in before.items() if "lock" not in k
    }
