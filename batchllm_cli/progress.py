"""Human output on stderr: progress while the job runs, and the one console everything goes through.

A TTY gets a live rich progress bar; anything else (cron, Airflow, a pipe) gets a plain log line every
few seconds, because redrawn bars turn into megabytes of garbage in log files.
"""
from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# The single sink for human-readable output; stdout is reserved for machine output (--summary -).
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str, console: Console | None = None) -> None:
    # Text(), not markup: messages quote user data (paths, column names) that may contain brackets.
    # Whitespace is collapsed because the contract is one line (library messages may span several).
    (console or err_console).print(Text("error: ", style="bold red") + Text(" ".join(message.split())))


def print_notice(message: str, console: Console | None = None) -> None:
    (console or err_console).print(Text("note: ", style="bold yellow") + Text(message))


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class LogProgress:
    """Plain periodic lines: rows done, rows/s, output tokens/s, ETA."""

    def __init__(self, console: Console, every_s: float = 10.0, every_rows: int = 0) -> None:
        self.console = console
        self.every_s = every_s
        self.every_rows = every_rows
        self.total = 0
        self.rows = 0
        self.tokens = 0
        self._t0 = 0.0
        self._last_t = 0.0
        self._last_rows = 0

    def notice(self, message: str) -> None:
        print_notice(message, self.console)

    def start(self, total_rows: int) -> None:
        self.total = total_rows
        self._t0 = self._last_t = time.monotonic()
        self.console.print(f"run: {total_rows} rows to process")

    def advance(self, rows: int, completion_tokens: int) -> None:
        self.rows += rows
        self.tokens += completion_tokens
        now = time.monotonic()
        due_rows = self.every_rows and self.rows - self._last_rows >= self.every_rows
        if now - self._last_t >= self.every_s or due_rows:
            self._log(now)

    def _log(self, now: float) -> None:
        self._last_t, self._last_rows = now, self.rows
        elapsed = max(now - self._t0, 1e-9)
        rate = self.rows / elapsed
        pct = 100.0 * self.rows / self.total if self.total else 100.0
        eta = _fmt_eta((self.total - self.rows) / rate) if rate > 0 and self.total else "?"
        self.console.print(
            f"run: {self.rows}/{self.total} rows ({pct:.0f}%), {rate:.1f} rows/s, "
            f"{self.tokens / elapsed:.1f} output tok/s, ETA {eta}"
        )

    def finish(self) -> None:
        if self.rows != self._last_rows:
            self._log(time.monotonic())


class RichProgress:
    """A live bar: rows done of total, output tokens/s, elapsed and ETA."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tokens = 0
        self._t0 = 0.0
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def notice(self, message: str) -> None:
        print_notice(message, self.console)

    def start(self, total_rows: int) -> None:
        self._t0 = time.monotonic()
        self._progress = Progress(
            TextColumn("[bold]rows"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tok_s]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("run", total=total_rows, tok_s="0.0")

    def advance(self, rows: int, completion_tokens: int) -> None:
        if self._progress is None or self._task is None:
            return
        self.tokens += completion_tokens
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        self._progress.update(self._task, advance=rows, tok_s=f"{self.tokens / elapsed:.1f}")

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def make_progress(console: Console | None = None) -> LogProgress | RichProgress:
    console = console or err_console
    return RichProgress(console) if console.is_terminal else LogProgress(console)
