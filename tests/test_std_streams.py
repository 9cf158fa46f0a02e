"""Closed or broken stdout and stderr (std_streams.py) never change what a command does or how it exits:
diagnostics to a stderr nobody reads are dropped, data to a stdout whose reader left (`| head -1`)
ends quietly, and `run`'s summary says the exit code the process really exits with.

Real processes (`python -m batchllm_cli`, the entry point's code), since what matters is the process's
own descriptors: a pipe whose reader is closed before the command writes to it (deterministic, where
`| true` would race), or a descriptor closed as `2>&-` closes it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_utils import FAST, write_template

ROOT = Path(__file__).resolve().parents[1]
ROWS = 6


def _cli(args: list[str], env: dict[str, str], tmp: Path, *, gone: str | None = None,
         closed: str | None = None) -> tuple[int, str]:
    """(exit code, stderr text) of `batchllm ARGS`. `gone`: "stdout" or "stderr" is a pipe whose
    reader left before the command started; `closed`: that descriptor is closed (`>&-`, `2>&-`)."""
    command = [sys.executable, "-m", "batchllm_cli", *args]
    if closed is not None:
        command = ["bash", "-c", f'exec "$@" {"2" if closed == "stderr" else ""}>&-', "bash", *command]
    log = tmp / "stderr.txt"
    with log.open("wb") as err:
        streams = {"stdout": subprocess.DEVNULL, "stderr": err}
        if gone is not None:
            streams[gone] = subprocess.PIPE
        if closed is not None:
            streams[closed] = subprocess.DEVNULL  # replaced by the close in bash
        proc = subprocess.Popen(command, cwd=tmp, stdout=streams["stdout"], stderr=streams["stderr"],
                                env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
        if gone is not None:
            getattr(proc, gone).close()
        code = proc.wait(timeout=300)
    return code, log.read_text(errors="replace")


@pytest.fixture
def job(tmp_path: Path, env: dict[str, str]) -> Path:
    """An input with one null text: that row is in error, so a finished run exits 3 (not 0 or 1)."""
    (tmp_path / "in.csv").write_text("id,text\n" + "".join(
        f"{i},{'' if i == 2 else f'review {i}'}\n" for i in range(ROWS)))
    write_template(tmp_path / "t.j2")
    return tmp_path


def _run_args(*extra: str) -> list[str]:
    return ["run", "in.csv", "-t", "t.j2", "-o", "o.parquet", *FAST, *extra]


def _finished(tmp: Path) -> None:
    marker = json.loads((tmp / "o.parquet.success.json").read_text())
    assert (marker["rows"], marker["rows_failed"]) == (ROWS, 1)


@pytest.mark.parametrize("closed, gone", [("stderr", None), (None, "stderr")], ids=["2>&-", "stderr-reader-gone"])
def test_run_with_nobody_on_stderr_finishes_with_the_jobs_exit_code(
    job: Path, env: dict[str, str], closed: str | None, gone: str | None
) -> None:
    code, _ = _cli(_run_args("--summary", "s.json"), env, job, closed=closed, gone=gone)
    summary = json.loads((job / "s.json").read_text())
    assert (code, summary["exit_code"], summary["state"]) == (3, 3, "finished_with_errors")
    _finished(job)


@pytest.mark.parametrize("closed, gone", [("stdout", None), (None, "stdout")], ids=[">&-", "stdout-reader-gone"])
def test_run_summary_to_a_stdout_nobody_reads_keeps_the_jobs_exit_code(
    job: Path, env: dict[str, str], closed: str | None, gone: str | None
) -> None:
    code, stderr = _cli(_run_args("--summary", "-"), env, job, closed=closed, gone=gone)
    assert code == 3, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    _finished(job)


@pytest.mark.parametrize("command, expect", [
    (["analyze", "in.csv", "-t", "t.j2", "--html", "r.html"], 0),
    (["render", "in.csv", "-t", "t.j2"], 0),
    (["status", "o.parquet"], 12),  # not started: the state's exit code
    (["recipes"], 0),
], ids=["analyze", "render", "status", "recipes"])
def test_data_commands_whose_reader_left_exit_as_they_would(
    job: Path, env: dict[str, str], command: list[str], expect: int
) -> None:
    code, stderr = _cli(command, env, job, gone="stdout")
    assert code == expect, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    if command[0] == "analyze":
        assert (job / "r.html").stat().st_size > 0  # the report files still follow
