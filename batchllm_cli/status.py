"""`batchllm status OUTPUT|RUN_DIR`: how far a run is, read from its files only (cheap, no locks taken).

State is one of: finished (a valid completion marker, and the output has the sha256 it records),
running (a process holds the output's lock: found by trying to take it, not from the pid written in it),
interrupted (a checkpoint exists, nobody is working on it: run the same command to resume),
not started (nothing on disk); the exit code says which (0 or 3 finished, 10, 11, 12). Progress and
ETA come from the commit records of the shards: the rate is the rows committed over the span of the
recent commits. Given an output, the run directory is OUTPUT.batchllm/, or the --checkpoint-dir that
OUTPUT.checkpoint.json names (written by the run; see output_files.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from batchllm_cli.checkpoint import MANIFEST, read_commit_records
from batchllm_cli.durable import CORRUPT, read_json
from batchllm_cli.file_lock import lock_is_held, lock_owner
from batchllm_cli.output_files import (
    default_run_dir, is_foreign_output, output_lock_path, recorded_run_dir, run_dir_pointer_path,
)
from batchllm_cli.errors import (
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_STATUS_INTERRUPTED,
    EXIT_STATUS_NOT_STARTED,
    EXIT_STATUS_RUNNING,
    UsageError,
)
from batchllm_cli.job_types import iso_utc
from batchllm_cli.marker import MalformedMarker, Marker, read_marker

_RATE_WINDOW = 20  # commits used for the rate (recent speed, not the average since the start)


@dataclass(frozen=True)
class RunStatus:
    state: str  # finished | running | interrupted | not started
    output: str | None
    run_dir: str | None
    rows_total: int | None
    rows_done: int
    rows_failed: int
    rows_rejected: int
    shards: int
    percent: float | None
    rows_per_s: float | None
    eta_s: float | None
    started_at: float | None
    last_commit_at: float | None
    finished_at: float | None
    pid: int | None
    problems: tuple[str, ...] = ()  # malformed or stale files, one line each

    @property
    def exit_code(self) -> int:
        """What `status` exits with: a sensor branches on it (errors.STATUS_EXIT_CODES_HELP)."""
        if self.state == "finished":
            return EXIT_ROWS_FAILED if self.rows_failed or self.rows_rejected else EXIT_OK
        return {"running": EXIT_STATUS_RUNNING, "interrupted": EXIT_STATUS_INTERRUPTED}.get(
            self.state, EXIT_STATUS_NOT_STARTED)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["problems"] = list(self.problems)
        data["exit_code"] = self.exit_code
        return data


def _rate(records: list[dict[str, Any]], since: float | None = None) -> float | None:
    """Rows per second over the last commits, those after `since` only (the running attempt's start:
    a window reaching into an earlier attempt counted the pause between them as work)."""
    if since is not None:
        records = [r for r in records if r["committed_at"] >= since]
    recent = sorted(records, key=lambda r: r["committed_at"])[-_RATE_WINDOW:]
    if len(recent) < 2:
        return None
    span = recent[-1]["committed_at"] - recent[0]["committed_at"]
    rows = sum(r["rows"] for r in recent[1:])
    return rows / span if span > 0 else None


def _count(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _run_dir_of_output(output: Path, problems: list[str]) -> tuple[Path, Any]:
    """The output's run directory and its manifest (read_json's value): the --checkpoint-dir that
    OUTPUT.checkpoint.json names while it holds this output's checkpoint, else OUTPUT.batchllm/."""
    recorded, problem = recorded_run_dir(output)
    if problem:
        problems.append(problem)
    if recorded is not None:
        manifest = read_json(recorded / MANIFEST)
        named = manifest.get("output") if isinstance(manifest, dict) else None
        if isinstance(named, str) and named and Path(named) != output.resolve():
            problems.append(f"the checkpoint directory {recorded} named in {run_dir_pointer_path(output)} now "
                            f"holds the checkpoint of {named}; give each output's job a --checkpoint-dir of "
                            "its own.")
        elif manifest is not None:
            return recorded, manifest
        # (no manifest: that checkpoint is gone, the job finished or it was deleted)
    run_dir = default_run_dir(output)
    return run_dir, read_json(run_dir / MANIFEST)


def read_status(target: Path) -> RunStatus:
    problems: list[str] = []
    if (target / MANIFEST).is_file() or (target.is_dir() and target.name.endswith(".batchllm")):
        run_dir: Path = target
        manifest = read_json(target / MANIFEST)
        out = manifest.get("output") if isinstance(manifest, dict) else None
        output = Path(out) if isinstance(out, str) and out else None
    elif target.is_dir():
        raise UsageError(f"{target} is neither an output file nor a batchllm run directory.")
    else:
        output = target
        run_dir, manifest = _run_dir_of_output(target, problems)
    if manifest is CORRUPT or (manifest is not None and not isinstance(manifest, dict)):
        problems.append(f"the checkpoint manifest {run_dir / MANIFEST} cannot be read.")
    manifest = manifest if isinstance(manifest, dict) else None

    marker: Marker | None = None
    if output is not None:
        try:
            marker = read_marker(output)
        except MalformedMarker as exc:
            problems.append(f"{exc}.")
    running = output is not None and lock_is_held(output_lock_path(output))
    owner = lock_owner(output_lock_path(output)) if running and output is not None else None
    records, malformed = read_commit_records(run_dir) if run_dir.is_dir() else ([], 0)
    if malformed:
        problems.append(f"{malformed} commit record(s) in {run_dir} are malformed; their rows run again on resume.")
    total = _count(manifest, "total_rows") if manifest else None
    rejected = (_count(manifest, "rows_rejected") or 0) if manifest else 0
    started = _number(manifest, "created_at") if manifest else None
    last_commit = max((r["committed_at"] for r in records), default=None)
    run_dir_shown = str(run_dir) if run_dir.is_dir() else None

    if marker is not None and not running:
        assert output is not None
        if marker.matches_output(output):
            if run_dir_shown is not None and not ((run_dir / MANIFEST).exists() and records):
                # no checkpoint, nothing to resume: what a cleanup killed before it removed the directory left
                # (its results and commit records go first, its manifest last)
                problems.append(f"{run_dir} is what was left when this finished job's cleanup was cut short; "
                                "the next run of the same command removes it (or delete it).")
                run_dir_shown, records, last_commit = None, [], None
            return RunStatus(
                state="finished", output=str(output), run_dir=run_dir_shown,
                rows_total=marker.rows, rows_done=marker.rows, rows_failed=marker.rows_failed,
                rows_rejected=marker.rows_rejected, shards=len(records), percent=100.0,
                rows_per_s=None, eta_s=0.0, started_at=started, last_commit_at=last_commit,
                finished_at=marker.finished_at, pid=None, problems=tuple(problems),
            )
        problems.append(f"{output} is missing or no longer matches its completion marker; run the same "
                        "command again to rebuild it.")
    if output is not None and not running and is_foreign_output(output, manifest is not None):
        # what `run` refuses to replace without --overwrite: not a job that has yet to start
        raise UsageError(f"{output} exists but no batchllm job wrote it (no completion marker or checkpoint "
                         "beside it); `batchllm run` refuses to replace it without --overwrite.")
    done = sum(r["rows"] for r in records)
    failed = sum(r["errors"] for r in records)
    if running:
        state = "running"
    elif manifest is not None:
        state = "interrupted"
    else:
        state = "not started"
    since = _number(owner, "since") if owner else None
    rate = _rate(records, since if running else None)
    eta = None
    if rate and total is not None and state == "running":
        eta = max(total - done, 0) / rate
    percent = 100.0 * done / total if total else (100.0 if total == 0 else None)
    pid = owner.get("pid") if owner else None
    return RunStatus(
        state=state, output=str(output) if output else None, run_dir=run_dir_shown,
        rows_total=total, rows_done=done, rows_failed=failed, rows_rejected=rejected, shards=len(records),
        percent=round(percent, 2) if percent is not None else None,
        rows_per_s=round(rate, 3) if rate else None, eta_s=round(eta, 1) if eta is not None else None,
        started_at=started, last_commit_at=last_commit, finished_at=None, pid=pid, problems=tuple(problems),
    )


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    # UTC, as progress lines and the summary print times: never the machine's zone, which the text would not name
    return f"{iso_utc(ts)} ({max(time.time() - ts, 0):.0f} s ago)"


def format_status(st: RunStatus) -> str:
    total = "?" if st.rows_total is None else str(st.rows_total)
    pct = f" ({st.percent:.1f}%)" if st.percent is not None else ""
    lines = [f"state: {st.state}" + (f" (pid {st.pid})" if st.pid else "")]
    if st.output:
        lines.append(f"output: {st.output}")
    if st.run_dir:
        lines.append(f"checkpoint: {st.run_dir} ({st.shards} shards)")
    lines.append(f"rows: {st.rows_done}/{total} done{pct}, {st.rows_failed} in error"
                 + (f", {st.rows_rejected} rejected input lines" if st.rows_rejected else ""))
    if st.state == "running":
        rate = f"{st.rows_per_s:.1f} rows/s" if st.rows_per_s else "rate unknown yet"
        eta = str(timedelta(seconds=int(st.eta_s))) if st.eta_s is not None else "?"
        lines.append(f"speed: {rate}, ETA {eta}")
    if st.started_at:
        lines.append(f"started: {_ago(st.started_at)}")
    if st.last_commit_at:
        lines.append(f"last commit: {_ago(st.last_commit_at)}")
    if st.finished_at:
        lines.append(f"finished: {_ago(st.finished_at)}")
    lines += [f"problem: {p}" for p in st.problems]
    if st.state == "interrupted":
        lines.append("run the same `batchllm run` command again to resume.")
    return "\n".join(lines)


def status_json(st: RunStatus) -> str:
    return json.dumps(st.to_dict(), indent=2) + "\n"
