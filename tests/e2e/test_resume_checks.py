"""A resume refuses a model of another size in one line (before any weight is read), and metrics.jsonl holds each
evaluation once however the run was resumed (from an older checkpoint, or one saved before its step's evaluation)."""

from __future__ import annotations

import json

from conftest import TINY_BERT, tiny_bert_train_args

from fulltune.cli import main


def _rows(run) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"]) for r in rows if r["split"] == "val"]


def test_resume_with_another_model_size_is_one_error_line(tmp_path, text_data, capsys):
    run = tmp_path / "run"
    assert main(tiny_bert_train_args(text_data, run, "data.batch_size=16", "training.num_epochs=1")) == 0
    for change, said in (
        ({"hidden_size": 64}, "hidden_size 32; this run: hidden_size 64"),
        ({"num_hidden_layers": 3}, "num_hidden_layers 2; this run: num_hidden_layers 3"),
    ):
        capsys.readouterr()
        argv = tiny_bert_train_args(text_data, run, "data.batch_size=16", "training.num_epochs=2")
        argv += [f"model.tiny_config={json.dumps(TINY_BERT | change)}", "--resume", "auto"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("fulltune: error:") == 1 and "Traceback" not in err, err
        assert f"was written for a model of another size ({said})" in err


def test_each_validation_row_is_written_once_after_a_resume(tmp_path, text_data):
    run = tmp_path / "run"
    every = ["data.batch_size=8", "checkpoint.keep_last=0", "checkpoint.save_every_steps=2"]  # 4 steps an epoch
    assert (
        main(tiny_bert_train_args(text_data, run, *every, "training.num_epochs=1", "training.eval_every_steps=2")) == 0
    )
    assert _rows(run) == [("val", 2), ("val", 4)]
    # From an older checkpoint: steps 3-4 and their evaluation run again, and replace the rows they wrote.
    argv = [*every, "training.num_epochs=1", "training.eval_every_steps=2", "--resume", str(run / "checkpoint-step-2")]
    assert main(tiny_bert_train_args(text_data, run, *argv)) == 0
    assert _rows(run) == [("val", 2), ("val", 4)]
    # checkpoint-step-4 holds the evaluation of step 4: evaluating per epoch now, the resume does not repeat it.
    argv = [*every, "training.num_epochs=2", "--resume", str(run / "checkpoint-step-4")]
    assert main(tiny_bert_train_args(text_data, run, *argv)) == 0
    assert _rows(run) == [("val", 2), ("val", 4), ("val", 8)]
    # checkpoint-step-8 was saved before the end-of-epoch evaluation of step 8: a resume from it runs that again.
    argv = [*every, "training.num_epochs=2", "--resume", str(run / "checkpoint-step-8")]
    assert main(tiny_bert_train_args(text_data, run, *argv)) == 0
    assert _rows(run) == [("val", 2), ("val", 4), ("val", 8)]


def test_a_resume_of_a_finished_run_deletes_a_checkpoint_beyond_keep_last(tmp_path, text_data):
    # A kill between the last checkpoint's rename and the deletion of the one before it leaves one too many; the run,
    # resumed, has nothing left to train but still keeps only checkpoint.keep_last of them.
    import shutil

    from fulltune.state.checkpoint import list_checkpoints

    run = tmp_path / "run"
    argv = tiny_bert_train_args(text_data, run, "data.batch_size=16", "training.num_epochs=2", "checkpoint.keep_last=1")
    assert main(argv) == 0
    (last,) = list_checkpoints(run)
    shutil.copytree(last, run / "checkpoint-step-1")  # what the kill left: an older checkpoint not yet deleted
    assert len(list_checkpoints(run)) == 2
    assert main([*argv, "--resume", "auto"]) == 0
    assert [p.name for p in list_checkpoints(run)] == [last.name]
