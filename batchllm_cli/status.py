"""`batchllm status OUTPUT|RUN_DIR`: how far a run is, read from its files only (cheap, no locks taken).

State is one of: finished (completion marker present), running (a live process holds the output's
lock), interrupted (a checkpoint exists, nobody is working on it: run the same command to resume),
not started (nothing on disk). Progress and ETA come from the commit records of the shards: the rate
is the rows committed over the span of the recent commits.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from batchllm_cli.checkpoint import (
    MANIFEST,
    _CORRUPT,
    _read_json,
    default_run_dir,
    lock_owner,
    marker_path,
    output_lock_path,
    read_commit_records,
)
from batchllm_cli.errors import UsageError

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(records: list[dict[str, Any]]) -> float | None:
    recent = sorted(records, key=lambda r: r.get("committed_at", 0.0))[-_RATE_WINDOW:]
    if len(recent) < 2:
        return None
    span = recent[-1]["committed_at"] - recent[0]["committed_at"]
    rows = sum(int(r.get("rows", 0)) for r in recent[1:])
    return rows / span if span > 0 else None


def read_status(target: Path) -> RunStatus:
    if (target / MANIFEST).is_file() or (target.is_dir() and target.name.endswith(".batchllm")):
        run_dir: Path = target
        manifest = _read_json(target / MANIFEST)
        out = manifest.get("output") if isinstance(manifest, dict) else None
        output = Path(out) if out else None
    elif target.is_dir():
        raise UsageError(f"{target} is neither an output file nor a batchllm run directory.")
    else:
        output = target
        run_dir = default_run_dir(target)
        manifest = _read_json(run_dir / MANIFEST)
    if manifest is _CORRUPT:
        manifest = None

    marker = _read_json(marker_path(output)) if output is not None else None
    owner = lock_owner(output_lock_path(output)) if output is not None else None
    records = read_commit_records(run_dir) if run_dir.is_dir() else []
    total = manifest.get("total_rows") if isinstance(manifest, dict) else None
    rejected = int(manifest.get("rows_rejected", 0)) if isinstance(manifest, dict) else 0

    if isinstance(marker, dict) and marker.get("status") == "finished" and owner is None:
        rows = int(marker.get("rows", 0))
        return RunStatus(
            state="finished", output=str(output), run_dir=str(run_dir) if run_dir.is_dir() else None,
            rows_total=rows, rows_done=rows, rows_failed=int(marker.get("rows_failed", 0)),
            rows_rejected=int(marker.get("rows_rejected", 0)), shards=len(records), percent=100.0,
            rows_per_s=None, eta_s=0.0, started_at=manifest.get("created_at") if isinstance(manifest, dict) else None,
            last_commit_at=max((r.get("committed_at", 0.0) for r in records), default=None),
            finished_at=marker.get("finished_at"), pid=None,
        )
    done = sum(int(r.get("rows", 0)) for r in records)
    failed = sum(int(r.get("errors", 0)) for r in records)
    if owner is not None:
        state = "running"
    elif manifest is not None:
        state = "interrupted"
    else:
        state = "not started"
    rate = _rate(records)
    eta = None
    if rate and total is not None and state == "running":
        eta = max(total - done, 0) / rate
    percent = 100.0 * done / total if total else (100.0 if total == 0 else None)
    return RunStatus(
        state=state, output=str(output) if output else None, run_dir=str(run_dir) if run_dir.is_dir() else None,
        rows_total=total, rows_done=done, rows_failed=failed, rows_rejected=rejected, shards=len(records),
        percent=round(percent, 2) if percent is not None else None,
        rows_per_s=round(rate, 3) if rate else None, eta_s=round(eta, 1) if eta is not None else None,
        started_at=manifest.get("created_at") if isinstance(manifest, dict) else None,
        last_commit_at=max((r.get("committed_at", 0.0) for r in records), default=None),
        finished_at=None, pid=int(owner["pid"]) if owner else None,
    )


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({max(time.time() - ts, 0):.0f} s ago)"


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
    if st.state == "interrupted":
        lines.append("run the same `batchllm run` command again to resume.")
    return "\n".join(lines)


def status_json(st: RunStatus) -> str:
    return json.dumps(st.to_dict(), indent=2) + "\n"
