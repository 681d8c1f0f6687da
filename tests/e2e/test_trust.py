"""Trust: nothing fulltune loads runs code; a kill at any instant, then `--resume auto`, ends bit-identical to an
uninterrupted run; a damaged checkpoint is skipped (auto) or named (explicit); a run folder belongs to one run."""

from __future__ import annotations

import json
import os
import pickle
import random
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TINY_VIT, base_overrides
from safetensors.torch import load_file

from fulltune.cli import main
from fulltune.files.rundir import LOCK_FILE, recover_run_dir
from fulltune.state import checkpoint as ckpt


class Payload:
    """A pickle that writes a marker file when unpickled (what an attacker's optimizer.pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _overrides(out: Path, data: Path, **extra) -> list[str]:
    values = base_overrides(
        out, TINY_BERT, data__data_dir=str(data), data__text_column="sentence", data__batch_size=8, **extra
    )
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


PICKLE_NAMES = (
    "optimizer.pt",
    "rng.pt",
    "scaler.pt",
    "scheduler.pt",
    "pytorch_model.bin",
    "training_args.bin",
    "trainer_state.pkl",
    "sampler.pkl",
)


def _plant(folder: Path, payload: bytes) -> list[Path]:
    planted = []
    for sub in (folder, folder / "training_state"):
        if sub.is_dir():
            for name in PICKLE_NAMES:
                (sub / name).write_bytes(payload)
                planted.append(sub / name)
    return planted


def test_planted_pickles_never_run(tmp_path, text_data, capsys):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(Payload(marker))
    # The payload is real: unpickling it runs its code.
    pickle.loads(payload)
    assert marker.read_text() == "code ran"
    marker.unlink()

    out = tmp_path / "run"
    code, _ = _cli(
        capsys,
        "train",
        *_overrides(out, text_data, training__num_epochs=1, checkpoint__save_every_steps=2, checkpoint__keep_last=0),
    )
    assert code == 0
    folders = [*ckpt.list_checkpoints(out), out / "best"]
    planted = [p for f in folders for p in _plant(f, payload)]
    assert len(planted) > 20

    # resume (auto and explicit), evaluate, predict: every one reads checkpoints that hold the planted pickles
    code, err = _cli(
        capsys,
        "train",
        "--resume",
        "auto",
        *_overrides(out, text_data, training__num_epochs=2, checkpoint__save_every_steps=2, checkpoint__keep_last=0),
    )
    assert code == 0, err
    code, err = _cli(
        capsys,
        "train",
        "--resume",
        str(out / "checkpoint-step-2"),
        *_overrides(tmp_path / "run2", text_data, training__num_epochs=1),
    )
    assert code == 0, err
    for folder in (out / "best", out / "checkpoint-step-2"):
        assert _cli(capsys, "evaluate", "--checkpoint", str(folder), "--data_dir", str(text_data))[0] == 0
        assert _cli(capsys, "predict", "--checkpoint", str(folder), "--text", "a great film")[0] == 0
    # compare reuses a finished run folder (it reads summary.json and config.yaml only)
    from fulltune.compare.runner import run_method
    from fulltune.config import load_config

    cfg = load_config(out / "config.yaml")
    _plant(out, payload)
    assert run_method(cfg, skip_done=True)["status"] == "ok"

    # A checkpoint written before this change (a pickled optimizer.pt, no optimizer.json) is refused, not loaded.
    old = out / "checkpoint-step-2"
    for f in (old / "training_state").glob("optimizer.*"):
        if f.suffix != ".pt":
            f.unlink()
    code, err = _cli(capsys, "train", "--resume", str(old), *_overrides(tmp_path / "run3", text_data))
    assert code == 2 and "optimizer.pt" in err and "pickle" in err
    # The payload planted as the JSON and safetensors files themselves: a damaged file, never code.
    victim = ckpt.list_checkpoints(out)[-1]
    for name in ("training_state/trainer_state.json", "training_state/rng.safetensors", "model.safetensors"):
        (victim / name).write_bytes(payload)
        code, err = _cli(capsys, "train", "--resume", str(victim), *_overrides(tmp_path / "run4", text_data))
        assert code == 2 and name.split("/")[-1] in err and "Traceback" not in err
    assert not marker.exists()


def test_lm_cache_is_never_unpickled(tmp_path):
    """The LM block cache: a pickle planted under the old .pt name or the new .safetensors name is never run."""
    from fulltune.config import DataConfig, load_config
    from fulltune.data import lm
    from fulltune.model.bundle import load_tokenizer

    marker = tmp_path / "MARKER"
    payload = pickle.dumps(Payload(marker))
    text = tmp_path / "train.txt"
    text.write_text("one two three four five six seven eight nine ten\n" * 20)
    tok = load_tokenizer(load_config(None, base_overrides(tmp_path, TINY_LLAMA)), None)
    lm.declare_eos(tok, DataConfig())  # MiniLM's [SEP] ends each record
    cfg = DataConfig(seq_len=16)
    first = lm.load_blocks(text, cfg, tok, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("lm-*.safetensors")
    cache.with_suffix(".pt").write_bytes(payload)
    cache.write_bytes(payload)
    again = lm.load_blocks(text, cfg, tok, tmp_path / "cache")  # damaged cache: rebuilt
    assert torch.equal(first.input_ids, again.input_ids) if hasattr(first, "input_ids") else len(first) == len(again)
    assert not marker.exists()


def test_a_cache_file_a_killed_process_was_writing_is_removed(tmp_path):
    """A temporary LM cache file left by a process that died mid-write goes when the cache is next written;
    one a live process is writing stays."""
    from fulltune.config import DataConfig, load_config
    from fulltune.data import lm
    from fulltune.model.bundle import load_tokenizer

    text = tmp_path / "train.txt"
    text.write_text("one two three four five six seven eight nine ten\n" * 20)
    tok = load_tokenizer(load_config(None, base_overrides(tmp_path, TINY_LLAMA)), None)
    lm.declare_eos(tok, DataConfig())  # MiniLM's [SEP] ends each record
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".lm-0123456789abcdef.safetensors.tmp-{dead.pid}"
    stale.write_bytes(b"half a cache")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = cache / f".lm-fedcba9876543210.safetensors.tmp-{live.pid}"
        busy.write_bytes(b"being written")
        lm.load_blocks(text, DataConfig(seq_len=16), tok, cache)
        assert not stale.exists() and busy.exists()
        assert [p.name for p in cache.glob("lm-*.safetensors")]  # the new cache itself was written
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------- damaged checkpoints


def test_damaged_newest_checkpoint_is_skipped_by_auto_and_named_when_explicit(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    args = _overrides(out, text_data, training__num_epochs=1, checkpoint__save_every_steps=1, checkpoint__keep_last=0)
    assert _cli(capsys, "train", *args)[0] == 0
    *_, good, newest = ckpt.list_checkpoints(out)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    code, err = _cli(capsys, "train", "--resume", str(newest), *args)
    assert code == 2 and str(weights) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert after == before  # nothing touched (but the lock file, which names the process holding the folder)

    more = _overrides(out, text_data, training__num_epochs=2, checkpoint__save_every_steps=1, checkpoint__keep_last=0)
    code = main(["train", "--resume", "auto", *more])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"skipping damaged checkpoint {newest}" in printed and "model.safetensors" in printed
    assert f"resumed from {good} " in printed


# ------------------------------------------------------------------------------------- one run per run folder


def test_run_folder_belongs_to_one_run(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    args = _overrides(out, text_data, training__max_steps=2, checkpoint__keep_last=0)
    assert _cli(capsys, "train", *args)[0] == 0
    first = {p: p.read_bytes() for p in out.glob("checkpoint-*/model.safetensors")}
    code, err = _cli(capsys, "train", *args)
    assert code == 2 and "--resume auto" in err and "--output_dir" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.glob("checkpoint-*/model.safetensors")} == first
    code, err = _cli(capsys, "train", "--overwrite", *args)
    assert code == 0, err
    assert len(list(out.glob("checkpoint-*"))) == 1


def test_compare_never_deletes_a_folder_it_did_not_create(tmp_path):
    from fulltune.compare.runner import run_method
    from fulltune.config import load_config

    run = tmp_path / "full"
    (run / "checkpoint-epoch-1").mkdir(parents=True)
    (run / "config.yaml").write_text("task: auto\n")
    row = run_method(load_config(None, {"output_dir": str(run)}))
    assert row["status"] == "failed" and "left untouched" in row["error"]
    assert (run / "checkpoint-epoch-1").is_dir() and (run / "config.yaml").is_file()


def test_recovery_restores_best_and_removes_temporaries(tmp_path):
    out = tmp_path / "run"
    (out / ".best.old-999999999").mkdir(parents=True)  # killed between the renames: best/ is missing
    (out / ".best.old-999999999" / "model.safetensors").write_bytes(b"old best")
    (out / ".checkpoint-step-4.tmp-999999999").mkdir()  # killed inside a save
    (out / ".checkpoint-step-2.del-999999999").mkdir()  # killed while deleting an old checkpoint
    logged: list[str] = []
    recover_run_dir(out, logged.append)
    assert (out / "best" / "model.safetensors").read_bytes() == b"old best"
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    assert len(logged) == 3 and any("restored" in m for m in logged)


# --------------------------------------------------------------------------------------------- fault injection

ZYGOTE = r"""
import contextlib, json, os, sys, traceback
import torch, transformers
# imported once, here, not in every child
from transformers.models.bert import modeling_bert  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401
from transformers.models.vit import modeling_vit  # noqa: F401
from fulltune.config import load_config
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.training.trainer import train
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ.update(job["env"])
            torch.set_num_threads(1)
            if "evaluate" in job:
                evaluate_checkpoint(**job["evaluate"])
            else:
                train(load_config(None, job["overrides"]), resume=job["resume"])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""

KILL_POINTS = (
    "inside-save",  # between the optimizer and RNG states of a resumable checkpoint
    "inside-export",  # after the weights of a checkpoint or best/, before its tokenizer, card and manifest
    "before-rename",
    "between-renames",  # the old folder renamed away, the new one not yet in place
    "after-rename",
    "deleting-old",
    "record-written",  # the end-of-run refresh of best/'s run record with the test metrics
    "record-renamed",
    "summary-written",
)
ONCE_PER_RUN = ("record-written", "record-renamed", "summary-written")


class Zygote:
    """One Python process that imported torch and transformers once and never ran a kernel: it forks a fresh
    training process per job, so each attempt costs no interpreter start-up and is safe to fork."""

    def __init__(self, log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TOKENIZERS_PARALLELISM="false")
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        assert self.proc.stdout and json.loads(self.proc.stdout.readline())["ready"]

    def run(self, overrides: dict, resume: str | None, env: dict[str, str], kill_after: float | None) -> int:
        log = str(Path(overrides["output_dir"]).parent / f"{Path(overrides['output_dir']).name}.log")
        return self.submit({"overrides": overrides, "resume": resume, "env": env, "log": log}, kill_after)

    def evaluate(self, log: Path, **kwargs: Any) -> int:
        """`fulltune evaluate` (evaluate_checkpoint's keyword arguments) in a forked child; its exit status."""
        return self.submit({"evaluate": kwargs, "env": {}, "log": str(log)}, None)

    def submit(self, job: dict, kill_after: float | None) -> int:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], kill_after)
            if not ready:
                os.kill(pid, 9)
        return json.loads(self.proc.stdout.readline())["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = dict(load_file(str(folder / "model.safetensors")))
    opt = folder / "training_state" / "optimizer.safetensors"
    if opt.is_file():
        out.update({f"optimizer/{k}": v for k, v in load_file(str(opt)).items()})
    return out


def _same(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _kill_runs(kind: str, tmp: Path, image_data: Path, text_data: Path) -> tuple[Any, dict[str, Any]]:
    """(overrides for an output folder, what `evaluate` takes besides the checkpoint) of a tiny run of `kind` with
    a checkpoint every 2 steps and an evaluation (and a new best/) at every step, test split at the end."""
    common = {
        "data__batch_size": 4,
        "data__num_workers": 0,
        "training__num_epochs": 2,
        "training__eval_every_steps": 1,
        "training__metric": "loss",
        "checkpoint__save_every_steps": 2,
        "checkpoint__keep_last": 2,
        "hardware__num_threads": 1,
        "training__base_learning_rate": 3e-3,
        "training__warmup_ratio": 0.0,
    }
    if kind == "image":  # random augmentation: the RNG states matter
        return (lambda out: base_overrides(out, TINY_VIT, data__data_dir=str(image_data), **common)), {
            "data_dir": str(image_data)
        }
    if kind == "text":
        extra = {"data__data_dir": str(text_data), "data__text_column": "sentence"}
        return (lambda out: base_overrides(out, TINY_BERT, **extra, **common)), {"data_dir": str(text_data)}
    lm = tmp / "lm"
    lm.mkdir()
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()
    rng = random.Random(0)
    for split, n in (("train", 60), ("val", 12), ("test", 12)):
        (lm / f"{split}.txt").write_text("".join(" ".join(rng.choices(words, k=9)) + "\n" for _ in range(n)))
    extra = {
        "task": "causal_lm",
        "data__data_dir": str(lm),
        "data__seq_len": 16,
        "model__tokenizer": "sentence-transformers/all-MiniLM-L6-v2",
    }
    return (lambda out: base_overrides(out, TINY_LLAMA, **extra, **common)), {"data_dir": str(lm), "split": "val"}


@pytest.mark.parametrize("kind", ["image", "text", "causal_lm"])
def test_sigkill_at_random_instants_then_resume_is_bit_identical(tmp_path, image_data, text_data, kind):
    """10+ SIGKILLs per kind of run (seeded; 30+ over image, text and causal-LM runs): at random times, and at named
    points inside every kind of save (inside a checkpoint, inside best/, between the two renames, while deleting an
    old checkpoint, while best/ gains its test metrics at the end, while summary.json is written), each followed by
    `evaluate` on best/ (it loads after every kill) and `--resume auto`. Every chain ends bit-identical to an
    uninterrupted run: best/, every checkpoint kept, and best/'s test metrics."""
    overrides, evaluation = _kill_runs(kind, tmp_path, image_data, text_data)
    zygote = Zygote(tmp_path / "zygote.log")
    try:
        began = time.perf_counter()
        assert zygote.run(overrides(tmp_path / "ref"), None, {}, None) == 0, (tmp_path / "ref.log").read_text()
        duration = time.perf_counter() - began
        ref = tmp_path / "ref"
        rng = random.Random(kind)
        kills, chains, attempts, evaluated, fired, next_point = 0, 0, 0, 0, set(), 0
        while kills < 10 and chains < 8:
            out = tmp_path / f"chain{chains}"
            chains += 1
            for attempt in range(12):
                attempts += 1
                env: dict[str, str] = {}
                timer = None
                if attempt < 9 and attempt % 3 != 2:
                    point = KILL_POINTS[next_point % len(KILL_POINTS)]  # each point in turn, across chains
                    next_point += 1
                    nth = 1 if attempt or point in ONCE_PER_RUN else rng.randint(1, 3)  # a resumed run is short
                    env["FULLTUNE_KILL_AT"] = f"{point}:{nth}"
                elif attempt < 9:
                    timer = rng.uniform(0.0, duration)
                status = zygote.run(overrides(out), "auto" if attempt else None, env, timer)
                if status == 0:
                    break
                assert status == -9, f"attempt {attempts} failed: {(tmp_path / f'{out.name}.log').read_text()[-3000:]}"
                kills += 1
                fired.add(env.get("FULLTUNE_KILL_AT", "timer:").split(":")[0])
                if (out / "best").is_dir() or list(out.glob(".best.old-*")):
                    log = tmp_path / f"eval{attempts}.log"
                    target = tmp_path / f"eval{attempts}"
                    code = zygote.evaluate(log, checkpoint=str(out / "best"), output_dir=str(target), **evaluation)
                    assert code == 0, f"best/ of {out} after kill {kills} ({env}): {log.read_text()[-3000:]}"
                    evaluated += 1
            assert (out / "summary.json").is_file()
            assert _same(ref / "best", out / "best"), f"{out}: best/ differs"
            record, reference = (json.loads((r / "best" / "fulltune_run.json").read_text()) for r in (out, ref))
            assert record["test_metrics"] == reference["test_metrics"]
            finals = [p.name for p in ckpt.list_checkpoints(out)]
            assert finals == [p.name for p in ckpt.list_checkpoints(ref)]
            for name in finals:
                assert _same(ref / name, out / name), f"{out / name} differs"
            stale = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
            assert not stale, stale
    finally:
        zygote.close()
    print(f"{kind}: {kills} kills in {chains} chains, {attempts} attempts, best/ evaluated {evaluated} times, ")
    print(f"{time.perf_counter() - began:.1f} s; killed at {sorted(fired)}")
    assert kills >= 10 and evaluated >= kills // 2 and len(fired) >= 8 and "timer" in fired
