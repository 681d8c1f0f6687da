"""Stopping a run on request. SIGINT (Ctrl-C) and SIGTERM (what `kill` and job schedulers send before they kill)
ask the training loop to stop at the next optimizer step, where it saves a checkpoint to resume from; a second
signal, or one before training has started, stops at once (`Interrupted`)."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from fulltune.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Installed for a training run (`with StopRequests() as stop:`), the previous handlers restored after it.
    `arm()` once the loop runs: from then on a signal only sets `signum`, which the loop reads after each step.
    Only the main thread can take signals; elsewhere (a notebook's worker thread) this does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The signal received while armed (the loop stops at its next step), else None."""
        self.armed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def arm(self) -> None:
        self.armed = True

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(f"interrupted by {name} before training started", signum)
        if self.signum is not None:
            raise Interrupted(f"interrupted by a second signal ({name}) before the checkpoint was saved", signum)
        self.signum = signum
