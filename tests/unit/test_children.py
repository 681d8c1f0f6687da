"""Child `fulltune` processes: forked from the fork server (or, where it cannot serve, fresh interpreters), each
one's exit code, output, peak RSS and CPU seconds are its own."""

from __future__ import annotations

import os
import signal
import time

from fulltune.runtime import children
from fulltune.runtime.children import Child


def _run(tmp_path, *argv, name="child"):
    log = tmp_path / f"{name}.log"
    child = Child(list(argv), log)
    code = child.wait(poll_s=0.05)
    return child, code, log.read_text(encoding="utf-8")


def test_forked_children_exit_codes_output_and_usage(tmp_path):
    first, code, text = _run(tmp_path, "train", "--help", name="help")
    assert code == 0 and "--output_dir" in text
    assert first.peak_rss_bytes > 50 * 2**20 and first.cpu_s > 0  # torch is imported: tens of MB at least
    start = time.perf_counter()
    second, code, text = _run(tmp_path, "train", "--config", str(tmp_path / "missing.yaml"), name="bad")
    assert code == 2 and text.strip().endswith(f"config file '{tmp_path / 'missing.yaml'}' does not exist")
    assert second.pid != first.pid and second.pid != os.getpid()
    key = tuple(sorted((dict(os.environ) | children.ENV).items()))
    assert children._servers[key] is not None  # both came from the one fork server of this environment
    assert time.perf_counter() - start < 60  # no time assertion on speed: only that it did not hang


def test_a_child_stopped_by_a_signal_reports_it(tmp_path):
    # the signal goes out as soon as the child's pid is known: its imports and argument parsing take far longer
    child = Child(["train", "--help"], tmp_path / "stopped.log")
    child.signal(signal.SIGKILL)
    assert child.wait(poll_s=0.05) == -signal.SIGKILL
    child.signal(signal.SIGTERM)  # after the end: nothing to signal, no error


def test_without_a_fork_server_a_child_is_a_fresh_interpreter(tmp_path, monkeypatch):
    key = tuple(sorted((dict(os.environ) | children.ENV).items()))
    monkeypatch.setitem(children._servers, key, None)
    child, code, text = _run(tmp_path, "train", "--config", str(tmp_path / "missing.yaml"), name="fresh")
    assert code == 2 and "does not exist" in text
    assert child.peak_rss_bytes > 0 and child.cpu_s > 0


def test_another_environment_gets_its_own_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLTUNE_TEST_MARK", "1")  # the server's imports read the environment once
    _, code, _ = _run(tmp_path, "train", "--config", str(tmp_path / "missing.yaml"), name="env")
    assert code == 2
    key = tuple(sorted((dict(os.environ) | children.ENV).items()))
    assert key in children._servers


def test_a_fork_that_cannot_use_cuda_becomes_a_fresh_interpreter(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)  # as after an import that asked CUDA
    monkeypatch.setattr(children.runpy, "run_module", None)  # the fork itself must not run fulltune: it would fail
    log, missing = tmp_path / "exec.log", tmp_path / "missing.yaml"
    request = {"argv": ["train", "--config", str(missing)], "log": str(log), "cwd": str(tmp_path)}
    pid = os.fork()
    if pid == 0:  # what the server's fork does
        os._exit(children._run_child(request | {"die_with_parent": False}))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert log.read_text(encoding="utf-8").strip().endswith(f"config file '{missing}' does not exist")
