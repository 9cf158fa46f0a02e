"""Human output on stderr: progress while the job runs, and the one console everything goes through.

A TTY gets a live rich progress bar; anything else (cron, Airflow, a pipe) gets a plain, timestamped
log line every few seconds (or JSON lines with --log-format json), because redrawn bars turn into
megabytes of garbage in log files. --quiet shows none.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from batchllm_cli.job_types import SilentObserver, WorkDone, iso_utc
from batchllm_cli.std_streams import DiagnosticsConsole

# The single sink for human-readable output; stdout is reserved for machine output (--summary -).
err_console = DiagnosticsConsole(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str, console: Console | None = None) -> None:
    # Text(), not markup: messages quote user data (paths, column names) that may contain brackets.
    # Whitespace is collapsed because the contract is one line (library messages may span several).
    (console or err_console).print(Text("error: ", style="bold red") + Text(" ".join(message.split())))


def print_notice(message: str, console: Console | None = None) -> None:
    (console or err_console).print(Text("note: ", style="bold yellow") + Text(message))


def print_event(event: str, fields: dict, console: Console | None = None) -> None:
    """One JSON object on one line (--log-format json): its `event`, the `time` (ISO 8601, UTC), the fields."""
    line = json.dumps({"event": event, "time": iso_utc(time.time()), **fields})
    # Text(), not markup: JSON and paths hold brackets; soft_wrap keeps a line one line.
    (console or err_console).print(Text(line), soft_wrap=True)


def _fmt_eta(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(seconds)))


@dataclass(frozen=True)
class ProgressLine:
    """One progress report: the job's rows, this attempt's rates and errors, the ETA from token work."""

    time: str  # ISO 8601, UTC
    rows_done: int  # of the job, rows resumed from a checkpoint included
    rows_total: int
    percent: float
    errors: int  # rows failed in this attempt so far
    rows_per_s: float
    prompt_tokens_per_s: float  # prompt tokens processed (computed or reused), running rows included
    output_tokens_per_s: float  # tokens generated, running rows included
    eta_s: float | None  # None until the first row finishes (the work per row is not known before)
    planning: bool = False  # the engine waits for the global plan (every row tokenized and sorted)

    def text(self) -> str:
        errors = f", {self.errors} error{'s' if self.errors != 1 else ''}" if self.errors else ""
        if self.planning:
            return (f"{self.time} run: {self.rows_done}/{self.rows_total} rows ({self.percent:.0f}%), planning: "
                    "tokenizing and sorting every row to share prefixes (plan_s in the summary)")
        return (
            f"{self.time} run: {self.rows_done}/{self.rows_total} rows ({self.percent:.0f}%){errors}, "
            f"{self.rows_per_s:.1f} rows/s, {self.prompt_tokens_per_s:.0f} prompt tok/s, "
            f"{self.output_tokens_per_s:.1f} output tok/s, ETA {_fmt_eta(self.eta_s)}"
        )

    def json(self) -> str:
        return json.dumps({"event": "progress", **dataclasses.asdict(self)})


class ProgressMeter:
    """Turns the job's work counters into progress lines. Progress is measured in tokens (prompt
    tokens processed + tokens generated, rows still running included), not in finished rows: rows
    finish late (a whole wave is prefilled first), so a row count says little early in a run. The
    total is estimated from the rows finished so far (prompt + output tokens per row)."""

    def __init__(self, total_rows: int, resumed_rows: int, work: Callable[[], WorkDone],
                 started: float | None = None) -> None:
        self.total = total_rows
        self.resumed = resumed_rows
        self.work = work
        self._t0 = time.monotonic() if started is None else started  # time.monotonic() when the rows began

    def line(self) -> ProgressLine:
        w = self.work()
        # the job's own clock when it keeps one: generation only, the global plan's wait left out
        elapsed = max(time.monotonic() - self._t0 if w.elapsed_s is None else w.elapsed_s, 1e-9)
        done = self.resumed + w.rows
        todo = self.total - done
        work_done = w.prompt_tokens_processed + w.output_tokens
        eta: float | None = 0.0 if todo <= 0 else None
        if todo > 0 and w.rows_run and work_done:
            per_row = (w.prompt_tokens + w.completion_tokens) / w.rows_run
            # rows that failed before the engine cost nothing; the others each cost about per_row
            work_total = (self.total - self.resumed - (w.rows - w.rows_run)) * per_row
            eta = max(work_total - work_done, 0.0) / (work_done / elapsed)
        return ProgressLine(
            time=iso_utc(time.time()) or "",
            rows_done=done,
            rows_total=self.total,
            percent=round(100.0 * done / self.total if self.total else 100.0, 2),
            errors=w.rows_failed,
            rows_per_s=round(w.rows / elapsed, 3),
            prompt_tokens_per_s=round(w.prompt_tokens_processed / elapsed, 3),
            output_tokens_per_s=round(w.output_tokens / elapsed, 3),
            eta_s=round(eta, 1) if eta is not None else None,
            planning=w.elapsed_s == 0.0 and not work_done,
        )


class _Ticker:
    """Calls `tick` every `every_s` seconds on a daemon thread until stopped: progress must move while
    no row finishes (a long prefill), and the job's thread is busy in the engine."""

    def __init__(self, every_s: float, tick: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s, tick), name="batchllm-progress", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float, tick: Callable[[], None]) -> None:
        while not self._stop.wait(every_s):
            tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class QuietProgress(SilentObserver):
    """--quiet: no progress; notes still go to stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def notice(self, message: str) -> None:
        print_notice(message, self.console)


class LogProgress:
    """A plain line every few seconds (cron, Airflow, a pipe): timestamped text, or one JSON object
    per line with --log-format json."""

    def __init__(self, console: Console, every_s: float = 10.0, as_json: bool = False) -> None:
        self.console = console
        self.every_s = every_s
        self.as_json = as_json
        self._meter: ProgressMeter | None = None
        self._ticker: _Ticker | None = None

    def _print(self, text: str) -> None:
        # Text(), not markup: JSON and paths hold brackets; soft_wrap keeps a line one line.
        self.console.print(Text(text), soft_wrap=True)

    def notice(self, message: str) -> None:
        if self.as_json:
            print_event("notice", {"message": message}, self.console)
        else:
            print_notice(message, self.console)

    def start(self, total_rows: int, resumed_rows: int, work: Callable[[], WorkDone]) -> None:
        self._meter = ProgressMeter(total_rows, resumed_rows, work)
        if self.as_json:
            print_event("start", {"rows_total": total_rows, "rows_resumed": resumed_rows}, self.console)
        else:
            todo = f"{total_rows - resumed_rows} of {total_rows} rows to process ({resumed_rows} already done)"
            self._print(f"{iso_utc(time.time())} run: {todo if resumed_rows else f'{total_rows} rows to process'}")
        self._ticker = _Ticker(self.every_s, self._log)

    def _log(self) -> None:
        if self._meter is not None:
            line = self._meter.line()
            self._print(line.json() if self.as_json else line.text())

    def advance(self, rows: int, completion_tokens: int) -> None:
        pass  # the ticker reads the job's counters

    def finish(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
            self._log()
        self._meter = None


class RichProgress:
    """A live bar: rows done of total, errors, prompt and output tok/s, elapsed, ETA from token work."""

    def __init__(self, console: Console, every_s: float = 0.5) -> None:
        self.console = console
        self.every_s = every_s
        self._meter: ProgressMeter | None = None
        self._ticker: _Ticker | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def notice(self, message: str) -> None:
        print_notice(message, self.console)

    def start(self, total_rows: int, resumed_rows: int, work: Callable[[], WorkDone]) -> None:
        self._meter = ProgressMeter(total_rows, resumed_rows, work)
        self._progress = Progress(
            TextColumn("[bold]rows"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]}"),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("run", total=total_rows, completed=resumed_rows, errors="",
                                             rates="", eta="?")
        self._ticker = _Ticker(self.every_s, self._update)

    def _update(self) -> None:
        if self._progress is None or self._task is None or self._meter is None:
            return
        line = self._meter.line()
        self._progress.update(
            self._task, completed=line.rows_done, errors=f"{line.errors} in error" if line.errors else "",
            rates=("planning (tokenizing and sorting every row)" if line.planning else
                   f"{line.prompt_tokens_per_s:.0f} prompt + {line.output_tokens_per_s:.1f} output tok/s"),
            eta=_fmt_eta(line.eta_s),
        )

    def advance(self, rows: int, completion_tokens: int) -> None:
        pass  # the ticker reads the job's counters

    def finish(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        self._update()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def make_progress(
    console: Console | None = None, quiet: bool = False, log_format: str = "text"
) -> QuietProgress | LogProgress | RichProgress:
    """--quiet: none; --log-format json: JSON lines; otherwise a bar on a terminal, log lines elsewhere."""
    console = console or err_console
    if quiet:
        return QuietProgress(console)
    if log_format == "json":
        return LogProgress(console, as_json=True)
    return RichProgress(console) if console.is_terminal else LogProgress(console)
