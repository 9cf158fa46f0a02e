"""The run directory: manifest, committed result shards, locks and the completion marker.

Layout of a run directory (default `OUTPUT.batchllm/` beside the output):

    manifest.json             the job's fingerprint and totals, written once when the run starts
    lock                      flock()ed by the run working on this directory (empty file)
    shard-000001.parquet      result rows (row id, answer, counts, error), immutable once renamed
    shard-000001.json         its commit record: rows, byte size, sha256, time; written last
    quarantine/               shards found torn or uncommitted on resume (their rows are recomputed)

A shard is committed when its commit record is durable and matches the shard's bytes: write temp ->
fsync -> rename -> fsync dir, for the shard and then for its record. On resume every record is checked
against its shard (size and sha256); a shard without a valid record, or whose bytes do not match
(truncated, garbage appended, deleted), is moved to quarantine/ and its rows run again.

Beside the output: `OUTPUT.lock` (held while a run works on the output; holds pid and host),
`OUTPUT.success.json` (the completion marker, written last: counts, output size and sha256, and the
fingerprint), `OUTPUT.errors.jsonl` (rows in error) and `OUTPUT.rejects.jsonl` (rejected CSV lines).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchllm_cli import __version__
from batchllm_cli.collector import SHARD_SCHEMA
from batchllm_cli.durable import atomic_write_bytes, crash_point, fsync_dir, is_disk_full, is_temp_of
from batchllm_cli.errors import BatchLLMError, OutputError, TempFailError
from batchllm_cli.table_io import ROW_ID

MANIFEST = "manifest.json"
RUN_LOCK = "lock"
QUARANTINE = "quarantine"
MANIFEST_FORMAT = 1
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.(parquet|json)$")


def default_run_dir(output: Path) -> Path:
    return output.with_name(output.name + ".batchllm")


def marker_path(output: Path) -> Path:
    return output.with_name(output.name + ".success.json")


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def rejects_path(output: Path) -> Path:
    return output.with_name(output.name + ".rejects.jsonl")


def output_lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return _CORRUPT


_CORRUPT = object()


def _wrap_write_error(what: Path, exc: BaseException) -> BatchLLMError:
    if is_disk_full(exc):
        return TempFailError(
            f"Cannot write {what}: no space left on device. Committed rows are kept; free some space and "
            "run the same command again to resume."
        )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OutputError(f"Cannot write {what}: {reason}.")


# ---- locks ------------------------------------------------------------------------------------------
class LockHeld(TempFailError):
    """Another process holds the lock (exit 75: try again later)."""


class FileLock:
    """An exclusive flock() on a file, taken without waiting.

    The kernel drops a flock when its holder dies, so the lock of a killed run is simply taken over.
    A holder may delete the lock file when it is done; a process that opened the old file just before
    notices (the path no longer names the file it locked) and retries with the new one.
    """

    def __init__(self, path: Path, *, remove_on_release: bool = False) -> None:
        self.path = path
        self.remove_on_release = remove_on_release
        self._fd: int | None = None
        self._touched = False  # we created the file or wrote to it (else a stale one stays as it was)

    def acquire(self, what: str) -> None:
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                owner = self._owner()
                raise LockHeld(
                    f"Another batchllm run{owner} is working on {what} (lock {self.path}); wait for it to "
                    "finish, or stop it and run this command again."
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: retry
                os.close(fd)
                continue
            self._fd = fd
            self._touched = created
            return
        raise LockHeld(f"Could not take the lock {self.path}; try again.")

    def record_owner(self) -> None:
        """Write our pid and host into the lock file (for the message another run prints)."""
        assert self._fd is not None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode() + b"\n", 0)
        self._touched = True

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f" (pid {info['pid']} on {info['host']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove_on_release and self._touched:
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_owner(path: Path) -> dict[str, Any] | None:
    """The pid/host recorded in a lock file, if the process is still alive on this host."""
    try:
        info = json.loads(path.read_text() or "{}")
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return info


# ---- shards -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    seq: int
    name: str
    rows: int
    errors: int
    bytes: int
    sha256: str
    committed_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Committed:
    """What a run directory holds that can be trusted."""

    shards: list[ShardInfo] = field(default_factory=list)
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    quarantined: list[str] = field(default_factory=list)
    next_seq: int = 1

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.shards)


class RunDir:
    """A run directory on disk (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest_path = path / MANIFEST
        self._lock = FileLock(path / RUN_LOCK)

    # -- manifest ------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """None when there is no manifest; BatchLLMError when it cannot be read."""
        data = _read_json(self.manifest_path)
        if data is None:
            return None
        if data is _CORRUPT or not isinstance(data, dict) or "fingerprint" not in data:
            raise OutputError(
                f"The checkpoint manifest {self.manifest_path} cannot be read; run with --restart to "
                "discard the checkpoint and start over."
            )
        return data

    def create(self, fingerprint: dict[str, Any], info: dict[str, Any]) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "run_id": uuid.uuid4().hex,
            "created_at": time.time(),
            "batchllm_version": __version__,
            "fingerprint": fingerprint,
            **info,
        }
        try:
            atomic_write_bytes(self.manifest_path, _json_bytes(manifest))
        except OSError as exc:
            raise _wrap_write_error(self.manifest_path, exc) from exc

    # -- lock ----------------------------------------------------------------------------------------
    def lock(self) -> None:
        self._lock.acquire(f"the checkpoint {self.path}")

    def unlock(self) -> None:
        self._lock.release()

    # -- lifecycle -----------------------------------------------------------------------------------
    def ensure(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _wrap_write_error(self.path, exc) from exc

    def wipe(self) -> None:
        """Discard every file of the old run (the lock file stays: we hold it)."""
        for p in self.path.iterdir():
            if p.name == RUN_LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        fsync_dir(self.path)

    def remove(self) -> None:
        """Delete the whole run directory (after the completion marker is durable)."""
        shutil.rmtree(self.path, ignore_errors=True)
        fsync_dir(self.path.parent)

    # -- shards --------------------------------------------------------------------------------------
    def _quarantine(self, paths: list[Path], committed: Committed) -> None:
        qdir = self.path / QUARANTINE
        qdir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for p in paths:
            if p.exists():
                target = qdir / f"{p.name}.{stamp}.{uuid.uuid4().hex[:6]}"
                os.replace(p, target)
                committed.quarantined.append(p.name)
        fsync_dir(qdir)
        fsync_dir(self.path)

    def load_committed(self, total_rows: int) -> Committed:
        """Verify every commit record against its shard; quarantine what does not check out."""
        committed = Committed(done=np.zeros(total_rows, dtype=bool))
        records: dict[int, Path] = {}
        shards: dict[int, Path] = {}
        max_seq = 0
        leftovers: list[Path] = []
        for p in self.path.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                seq = int(m.group(1))
                max_seq = max(max_seq, seq)
                (shards if m.group(2) == "parquet" else records)[seq] = p
            elif p.name.startswith(".shard-") and p.name.endswith(".tmp"):
                leftovers.append(p)  # a shard or record that never got renamed: never committed
        qdir = self.path / QUARANTINE
        if qdir.is_dir():
            for q in qdir.iterdir():
                m = re.match(r"^shard-(\d{6,})\.", q.name)
                if m:
                    max_seq = max(max_seq, int(m.group(1)))
        for p in leftovers:
            p.unlink()
        bad: list[Path] = []
        for seq in sorted(set(records) | set(shards)):
            record, shard = records.get(seq), shards.get(seq)
            info = self._verify(seq, record, shard, committed.done)
            if info is None:
                bad += [p for p in (record, shard) if p is not None]
            else:
                committed.shards.append(info)
        if bad:
            self._quarantine(bad, committed)
        committed.next_seq = max_seq + 1
        return committed

    def _verify(self, seq: int, record: Path | None, shard: Path | None, done: np.ndarray) -> ShardInfo | None:
        if record is None or shard is None:
            return None
        meta = _read_json(record)
        if not isinstance(meta, dict):
            return None
        try:
            data = shard.read_bytes()
        except OSError:
            return None
        if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        try:
            ids = pq.read_table(pa.BufferReader(data), columns=[ROW_ID]).column(ROW_ID).to_numpy()
        except (pa.ArrowException, OSError, ValueError):
            return None
        if len(ids) != meta.get("rows") or (len(ids) and (ids.min() < 0 or ids.max() >= len(done))):
            return None
        if done[ids].any():  # rows already committed by another shard: keep the first copy
            return None
        done[ids] = True
        return ShardInfo(
            seq=seq,
            name=shard.name,
            rows=int(meta["rows"]),
            errors=int(meta.get("errors", 0)),
            bytes=len(data),
            sha256=str(meta["sha256"]),
            committed_at=float(meta.get("committed_at", 0.0)),
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
        )

    def commit_shard(self, table: pa.Table, seq: int) -> ShardInfo:
        """Make `table` (SHARD_SCHEMA) a committed shard; durable when this returns."""
        assert table.schema.equals(SHARD_SCHEMA), table.schema
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        shard = self.path / f"shard-{seq:06d}.parquet"
        record = self.path / f"shard-{seq:06d}.json"
        errors = table.num_rows - table.column("error").null_count
        info = ShardInfo(
            seq=seq,
            name=shard.name,
            rows=table.num_rows,
            errors=errors,
            bytes=len(data),
            sha256=digest,
            committed_at=time.time(),
            prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            completion_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        )
        ids = table.column(ROW_ID)
        meta = {
            "shard": shard.name,
            "rows": info.rows,
            "errors": errors,
            "bytes": info.bytes,
            "sha256": digest,
            "first_row": ids[0].as_py() if len(ids) else None,
            "last_row": ids[-1].as_py() if len(ids) else None,
            "prompt_tokens": info.prompt_tokens,
            "completion_tokens": info.completion_tokens,
            "committed_at": info.committed_at,
        }
        try:
            atomic_write_bytes(
                shard,
                data,
                after_write="shard_write",
                after_fsync="shard_fsync",
                after_rename="shard_rename",
                after_dir_fsync="dir_fsync",
            )
            atomic_write_bytes(record, _json_bytes(meta))
        except OSError as exc:
            raise _wrap_write_error(shard, exc) from exc
        crash_point("manifest_update")
        return info

    def shard_files(self, committed: Committed) -> list[Path]:
        return [self.path / s.name for s in committed.shards]


def read_commit_records(run_dir: Path) -> list[dict[str, Any]]:
    """Commit records as they are (no verification): for `status`, which must be cheap."""
    out = []
    for p in sorted(run_dir.glob("shard-*.json")):
        data = _read_json(p)
        if isinstance(data, dict) and (run_dir / str(data.get("shard", ""))).is_file():
            out.append(data)
    return out


# ---- the completion marker -------------------------------------------------------------------------
def write_marker(output: Path, data: dict[str, Any]) -> None:
    path = marker_path(output)
    try:
        atomic_write_bytes(path, _json_bytes(data))
    except OSError as exc:
        raise _wrap_write_error(path, exc) from exc
    crash_point("marker")


def read_marker(output: Path) -> dict[str, Any] | None:
    data = _read_json(marker_path(output))
    return data if isinstance(data, dict) else None


def remove_stale_output_files(output: Path) -> None:
    """Temporary files a killed run left beside the output (never renamed, so never visible)."""
    parent = output.parent if str(output.parent) else Path(".")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        if is_temp_of(p, output):
            try:
                p.unlink()
            except OSError:
                pass
