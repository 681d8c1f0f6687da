"""Child `fulltune` processes (the runs of `compare`, the trials of `tune`): each one is `python -m fulltune ...`
with its output in a log file. On Linux they are forked from a helper process that has already imported torch,
transformers and fulltune's training code (a fork server), so a child skips the ~5-15 s of imports a fresh
interpreter pays; each child is still a process of its own (its own memory, signals, exit status and peak RSS).
Elsewhere, or where the server cannot start, a child is a fresh interpreter.

The server is `python -c "...serve()"` with this process's environment (one server per environment: the imports
read it once). It reads one JSON request a line on stdin ({"argv", "log", "cwd", "die_with_parent"}), forks, answers
`pid N`, and when a child ends writes `exit N CODE PEAK_RSS_BYTES CPU_SECONDS` (CODE negative: the signal that ended
it). It ends
with the process that started it (stdin closes; PR_SET_PDEATHSIG too); its children that asked for it then get
SIGTERM, as a run's "stop" signal (it saves a checkpoint).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fulltune.runtime.memory import maxrss_bytes

PRELOAD = (
    "fulltune.cli.train",  # first: fulltune.cli sets the environment and log filters the libraries' imports meet
    "torch",
    "transformers.modeling_utils",
    "fulltune.training.trainer",
    "matplotlib.pyplot",
)
"""What the fork server imports before it forks: what every `fulltune train` imports."""

ENV = {"TOKENIZERS_PARALLELISM": "false"}
"""Set for every child: the tokenizers library's own threads stay off in children that fork data workers."""

_servers: dict[tuple[tuple[str, str], ...], _Server | None] = {}
"""This process's fork servers, by environment (None: it could not start; children are fresh interpreters)."""


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """`sig` to this process when its parent dies, however it dies (SIGKILL too): Linux's PR_SET_PDEATHSIG."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------------------------- the server side


def _run_child(request: dict[str, Any]) -> int:
    """In the fork: a fresh `python -m fulltune ...` process's stdio, signals and argv, then fulltune's `__main__`;
    its exit code."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, f"fulltune {request['argv'][0]}"[:15].encode())  # 15 = PR_SET_NAME: what top and pkill see
    if request["die_with_parent"]:
        _die_with_parent()
    os.chdir(request["cwd"])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda._is_in_bad_fork():
        # Something the server imported asked CUDA for its devices, and CUDA cannot be used again after a fork:
        # this child becomes a fresh interpreter (same pid, log, environment), paying the imports once more.
        os.execv(sys.executable, [sys.executable, "-m", "fulltune", *request["argv"]])
    sys.argv = ["fulltune", *request["argv"]]
    try:
        runpy.run_module("fulltune", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child's last words go to its log, as an interpreter's would
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> None:
    """The fork server's loop (see the module's docstring)."""
    _die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children; the server outlives them to report
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    out, buf = sys.stdout, b""
    while True:
        if select.select([0], [], [], 0.2)[0]:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the process that started us has ended: so do we (our children get SIGTERM)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    os._exit(_run_child(json.loads(line)))
                out.write(f"pid {pid}\n")
                out.flush()
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            cpu = usage.ru_utime + usage.ru_stime
            out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)} {maxrss_bytes(usage)} {cpu:.3f}\n")
            out.flush()


# ------------------------------------------------------------------------------------------------- the caller side


class _Server:
    """A started fork server and what it has said so far."""

    def __init__(self, env: dict[str, str]) -> None:
        code = "from fulltune.runtime.children import serve; serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # import-time warnings; a child's own output goes to its log
            env=env,
            bufsize=0,
        )
        self.buf = b""
        self.ended: dict[int, tuple[int, int, float]] = {}  # pid -> (exit code, peak RSS bytes, CPU seconds)

    def start(self, request: dict[str, Any]) -> int:
        """Fork a child for `request`; its pid."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        while True:
            for line in self._lines(block=True):
                if line.startswith("pid "):
                    return int(line.split()[1])

    def _lines(self, block: bool) -> list[str]:
        """Lines the server has written (waiting for one when `block`); exit lines are recorded in `ended`."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            if not select.select([fd], [], [], None if block else 0)[0]:
                return []
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server of fulltune's child processes ended")
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        text = [x.decode() for x in lines]
        for line in text:
            if line.startswith("exit "):
                _, pid, code, peak, cpu = line.split()
                self.ended[int(pid)] = (int(code), int(peak), float(cpu))
        return text

    def poll(self, pid: int) -> tuple[int, int, float] | None:
        """(exit code, peak RSS bytes, CPU seconds) once child `pid` has ended, else None."""
        if pid not in self.ended and self.proc.poll() is None:
            self._lines(block=False)
        return self.ended.get(pid)

    def close(self) -> None:
        """End the server as this process's exit would (its stdin closed: it returns), and reap it."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        if server is not None:
            server.close()


def _server(env: dict[str, str]) -> _Server | None:
    key = tuple(sorted(env.items()))
    if key not in _servers:
        _servers[key] = _Server(env) if sys.platform.startswith("linux") and hasattr(os, "fork") else None
    return _servers[key]


class Child:
    """A running child `fulltune ARGV...` process, its output appended to `log_file`: `poll()` its exit code
    (negative: the signal that ended it), `signal` it, and read its `peak_rss_bytes` and `cpu_s` once it has ended.
    `die_with_parent`: it gets SIGTERM (saves a checkpoint and stops) when this process dies, however it dies."""

    def __init__(self, argv: Sequence[str], log_file: Path, die_with_parent: bool = False) -> None:
        env = dict(os.environ) | ENV
        self.returncode: int | None = None
        self.peak_rss_bytes: int | None = None
        self.cpu_s: float | None = None
        """User + system CPU seconds of the child (once it has ended)."""
        self._server = _server(env)
        self._proc: subprocess.Popen | None = None
        if self._server is not None:
            request = {"argv": list(argv), "log": str(Path(log_file).resolve()), "cwd": os.getcwd()}
            try:
                self.pid = self._server.start(request | {"die_with_parent": die_with_parent})
                return
            except (OSError, RuntimeError):  # the server could not start or has died: a fresh interpreter
                _servers[tuple(sorted(env.items()))] = self._server = None
        with open(log_file, "a", encoding="utf-8") as out:
            preexec = _die_with_parent if die_with_parent and sys.platform.startswith("linux") else None
            cmd = [sys.executable, "-m", "fulltune", *argv]
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)  # noqa: PLW1509
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        """The exit code once the child has ended, else None (never blocks)."""
        if self.returncode is not None:
            return self.returncode
        if self._server is not None:
            ended = self._server.poll(self.pid)
            if ended is None and self._server.proc.poll() is not None:
                ended = (-signal.SIGKILL, 0, 0.0)  # the server died: its children got SIGTERM or SIGKILL
            if ended is not None:
                self.returncode, peak, cpu = ended
                self.peak_rss_bytes, self.cpu_s = peak or None, cpu or None
        elif hasattr(os, "wait4"):
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.peak_rss_bytes, self.cpu_s = maxrss_bytes(usage), usage.ru_utime + usage.ru_stime
        else:
            self.returncode = self._proc.poll()  # type: ignore[union-attr]
        return self.returncode

    def wait(self, poll_s: float = 0.2) -> int:
        """Wait for the child to end; its exit code."""
        while self.poll() is None:
            time.sleep(poll_s)
        return self.returncode  # type: ignore[return-value]

    def signal(self, sig: int) -> None:
        """Send `sig` to the child (nothing when it has already ended)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


__all__ = ["ENV", "PRELOAD", "Child", "serve"]
