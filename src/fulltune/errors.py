"""The errors a user can cause. The command line turns each into one line `fulltune: error: ...` and a non-zero
exit; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import os
import re
from typing import Any


class FulltuneError(Exception):
    """Base of every expected failure; the message names the file, row or key and what was expected."""

    exit_code = 1


class ConfigError(FulltuneError, ValueError):
    """A bad config key, value, flag or file: the message names it and says what was expected."""

    exit_code = 2


class DataError(FulltuneError, ValueError):
    """Bad or missing data: the message names the file (and row) and what was expected."""


class TrainingError(FulltuneError, RuntimeError):
    """Training cannot go on (a NaN loss, say); the message says where and which checkpoint is the last good one."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C, SIGTERM): the message says where it stopped and what it saved. A
    KeyboardInterrupt, so that code which lets Ctrl-C through lets this through too."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        """The shell's code for a process ended by that signal (130 for SIGINT, 143 for SIGTERM)."""
        self.resumable = True
        """Whether the run left a checkpoint to resume from."""


class StateFileError(DataError):
    """A state file is missing, truncated, or not what fulltune wrote; the message names the file."""


def as_os_error(err: BaseException, path: Any = None) -> OSError | None:
    """The OSError behind a SafetensorError raised by the OS ("... No space left on device (os error 28)"), naming
    `path` when given, so that a full disk during a save reads like any other full disk; None for other errors."""
    found = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), *([os.fspath(path)] if path is not None else []))
