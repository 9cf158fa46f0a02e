"""stdout and stderr when nobody reads them: closed from the start (`2>&-`, `>&-`), or a pipe whose
reader went away (`| head -1`, `| true`, a log shipper that died). The policy every command follows,
as well-behaved Unix tools do for unattended use:

- stderr carries diagnostics only (notes, progress, the run's report, error lines). When it is closed
  or its reader is gone they are dropped: the job's outcome, its files and its exit code stay what
  they would have been with a terminal there.
- stdout carries a command's data (`run --summary -`, analyze's report, render's prompts, status,
  recipes). A reader that leaves early had all it wanted: the rest is dropped and the command ends as
  it would have (run with the job's exit code, status with the state's, the others 0); a stdout closed
  from the start is a reader that left before the first line.
- A standard descriptor (0, 1, 2) that is closed at start is opened on /dev/null: otherwise the next
  file the run opens (its lock, a shard, the output) would get that number, and whatever a library
  writes to "stderr" would land in it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, Iterator, TextIO

from rich.console import Console


def _devnull_onto(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class DroppingStream:
    """stderr for diagnostics: a write or flush that fails (EPIPE: its reader is gone) is dropped, and
    so is everything after it. Its descriptor then points at /dev/null, so that what C libraries write
    there and the text still buffered (flushed at exit) go nowhere instead of failing again."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._broken = False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._drop()
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._drop()

    def _drop(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError, ValueError):
            _devnull_onto(self._stream.fileno())

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's
        return getattr(self._stream, name)


class DiagnosticsConsole(Console):
    """The rich console of stderr. Rich's own answer to a broken pipe is to exit with 1 (and to point
    stdout, not its own stream, at /dev/null): here the diagnostics are dropped and the command goes on."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


class DataConsole(Console):
    """A rich console for a command's data on stdout: a reader that leaves raises BrokenPipeError, for
    `stdout_data` to end the writing quietly (rich's own default exits with 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of stdout is gone")


def protect_std_streams() -> None:
    """Apply the policy above to this process; the `batchllm` entry point calls it first. stdin stays
    None when it was closed, so INPUT '-' still says so instead of reading an empty table."""
    for fd in (0, 1, 2):  # in order: /dev/null then takes the lowest free number, the one missing
        if not _is_open(fd):
            _devnull_onto(fd)
    if sys.stdout is None:  # Python leaves it None when descriptor 1 was closed at start
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # /dev/null by now
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    if not isinstance(sys.stderr, DroppingStream):
        sys.stderr = DroppingStream(sys.stderr)  # type: ignore[assignment]


def stdout_gone() -> None:
    """The reader of stdout left: point stdout at /dev/null, so later writes and the interpreter's last
    flush of what is still buffered succeed (a failing flush at exit would turn the exit code to 120)."""
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            _devnull_onto(sys.stdout.fileno())


@contextlib.contextmanager
def stdout_data() -> Iterator[None]:
    """Around a command's writes of its data to stdout: a reader that leaves (BrokenPipeError) ends
    the writing quietly, and the command goes on to end as it would have."""
    try:
        yield
    except BrokenPipeError:
        stdout_gone()
