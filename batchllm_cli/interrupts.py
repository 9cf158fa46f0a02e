"""SIGINT/SIGTERM/SIGHUP during a run: stop soon, but never in the middle of committing a shard.

SIGHUP is what a run started from a terminal or over ssh gets when that goes away: the rows
already finished are worth keeping as much as on Ctrl-C. While a `SignalGuard` is installed, the
first of these signals raises `JobInterrupted` in the main
thread at once, unless a critical section (a shard commit) is running, in which case it is raised as
the section ends. `JobInterrupted` derives from BaseException so that no `except Exception` (a row's
template error handler, say) can swallow it. Once the job starts draining (committing the rows that
already finished, then exiting), further signals are only remembered.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator

from batchllm_cli.errors import EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM

_EXIT_CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}
if hasattr(signal, "SIGHUP"):  # not on Windows
    _EXIT_CODES[signal.SIGHUP] = EXIT_SIGHUP
_SIGNALS = tuple(_EXIT_CODES)


class JobInterrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES.get(self.signum, EXIT_SIGTERM)


class SignalGuard:
    def __init__(self) -> None:
        self.pending: int | None = None
        self.draining = False
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending = signum
        if self._depth == 0 and not self.draining:
            raise JobInterrupted(signum)

    def install(self) -> bool:
        """Install the handlers (only possible in the main thread); False when not installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return True

    def reclaim(self) -> None:
        """Take the signals back from a library that set its own handlers (ray.init does: its SIGTERM
        handler exits with status 1, committing nothing), if this guard is installed."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Signals arriving inside are deferred to the end of the section."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.pending is not None and not self.draining:
            raise JobInterrupted(self.pending)

    def check(self) -> None:
        if self.pending is not None and not self.draining:
            raise JobInterrupted(self.pending)


_NULL = SignalGuard()  # a guard that is never installed: critical() is a no-op for library callers


def null_guard() -> SignalGuard:
    return _NULL
