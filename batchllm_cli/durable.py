"""Durable file writes (temp -> fsync -> rename -> fsync dir), the crash-point test hook, and the JSON
files batchllm writes and reads back (manifest, commit records, marker).

A rename is atomic but not durable until its directory is fsynced; a file's bytes are not durable until
the file is fsynced. Every file batchllm commits goes through `atomic_write_bytes` (or does the same
steps itself), so after a crash a reader sees either the old state or the new one, never a torn file.

`BATCHLLM_CRASH_AT=POINT[:N][,POINT[:N]...]` makes the process exit abruptly (`os._exit(137)`, no
cleanup, as after `kill -9`) right after the N-th time (default 1st) it passes POINT. It exists for the
crash tests; the points are listed in `CRASH_POINTS`. `BATCHLLM_SIGNAL_AT=POINT` instead sends the process
SIGTERM the first time it passes POINT (a scheduler's kill arriving at exactly that moment).
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

from batchllm_cli.errors import BatchLLMError, OutputError, TempFailError, UsageError

CRASH_ENV = "BATCHLLM_CRASH_AT"
SIGNAL_ENV = "BATCHLLM_SIGNAL_AT"
CRASH_EXIT_CODE = 137
CRASH_POINTS = (
    "shard_write",  # a result shard's bytes are in its temporary file (not yet fsynced)
    "shard_fsync",  # ... the temporary shard file is fsynced
    "shard_rename",  # ... it is renamed to its final name (directory not yet fsynced)
    "dir_fsync",  # ... the run directory is fsynced (shard durable, but not yet committed)
    "manifest_update",  # ... the shard's commit record (name, rows, sha256) is durable: committed
    "final_write",  # the final output is complete in its temporary file (not yet renamed)
    "final_rename",  # ... renamed into place and its directory fsynced (no completion marker yet)
    "marker",  # the completion marker is durable (run directory not yet cleaned up)
    "cleanup",  # ... the run directory's files but its manifest are removed
    "cleanup_manifest",  # ... its manifest too (the directory itself not yet removed)
)

_crash_counts: dict[str, int] = {}


def _crash_plan() -> dict[str, int]:
    plan: dict[str, int] = {}
    for item in os.environ.get(CRASH_ENV, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition(":")
        plan[name.strip()] = int(nth) if nth.strip() else 1
    return plan


def crash_point(name: str) -> None:
    """Test hook: exit at once, like a power cut, when BATCHLLM_CRASH_AT names this point (SIGTERM
    when BATCHLLM_SIGNAL_AT does)."""
    if os.environ.get(SIGNAL_ENV) == name and name not in _crash_counts:
        _crash_counts[name] = 1
        os.kill(os.getpid(), signal.SIGTERM)
    if CRASH_ENV not in os.environ:
        return
    assert name in CRASH_POINTS, name
    nth = _crash_plan().get(name)
    if nth is None:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == nth:
        os._exit(CRASH_EXIT_CODE)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path if str(path) else ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # some filesystems cannot fsync directories
            raise
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """A unique hidden temporary name beside `final` (same directory, so the rename is atomic)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


_TEMP_SUFFIX = re.compile(r"^\.[0-9a-f]{12}\.tmp$")


def is_temp_of(candidate: Path, final: Path) -> bool:
    """Whether `candidate` is named exactly as `temp_name(final)` names its temporary files (so cleanup
    never takes a user's `.NAME.notes.tmp` for one)."""
    name, prefix = candidate.name, f".{final.name}"
    return name.startswith(prefix) and bool(_TEMP_SUFFIX.match(name[len(prefix):]))


def atomic_write_bytes(path: Path, data: bytes, *, after_write: str | None = None,
                       after_fsync: str | None = None, after_rename: str | None = None,
                       after_dir_fsync: str | None = None) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a torn file.

    The optional names are crash points passed after each step.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if after_write:
                crash_point(after_write)
            os.fsync(f.fileno())
        if after_fsync:
            crash_point(after_fsync)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if after_rename:
        crash_point(after_rename)
    fsync_dir(path.parent)
    if after_dir_fsync:
        crash_point(after_dir_fsync)


def remove_durably(paths: list[Path]) -> None:
    """Unlink files (missing ones are fine) and fsync their directories."""
    dirs: set[Path] = set()
    for p in paths:
        try:
            p.unlink()
            dirs.add(p.parent)
        except FileNotFoundError:
            pass
    for d in dirs:
        fsync_dir(d)


# A write that no more bytes fit: the disk, the user's quota, or the largest file allowed (EFBIG: the
# process's file size limit, `ulimit -f`, whose SIGXFSZ Python ignores, or the filesystem's). The
# reason as a message says it, for library messages (DuckDB, Arrow) that carry only the text.
_FULL_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}


def disk_full_reason(exc: BaseException) -> str | None:
    """Why `exc` is a write that did not fit (one of _FULL_REASONS), as an OSError or inside a library's
    message; None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _FULL_REASONS:
        return _FULL_REASONS[exc.errno]
    text = str(exc).lower()
    return next((reason for reason in _FULL_REASONS.values() if reason in text), None)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT / EFBIG: the run stops with exit 75 and resumes once there is room."""
    return disk_full_reason(exc) is not None


def full_disk_fix(reason: str) -> str:
    """What to do about a write that did not fit, for `disk_full_reason`'s reason."""
    if reason == _FULL_REASONS[errno.EFBIG]:
        return "raise the file size limit (ulimit -f)"
    return "free some space"


def _nearest_existing(directory: Path) -> Path:
    path = directory.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(directory: Path, what: str) -> None:
    """UsageError unless `directory` exists and a file can be created in it, or it can be created:
    probed in the nearest existing directory above it, with a file removed at once, so a refused run
    leaves nothing behind (root ignores mode bits, so only a real write tells a read-only mount apart)."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise UsageError(f"{what} {directory} is not writable: {existing} is not a directory.")
    probe = existing / f".batchllm.{uuid.uuid4().hex}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{what} {directory} is not writable: {exc.strerror or exc}.") from exc


def make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, outermost first (for remove_dirs)."""
    missing = []
    path = directory.absolute()
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_dirs(created: list[Path]) -> None:
    """Remove directories make_dirs created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


CORRUPT = object()  # read_json of a file that exists but is not valid JSON


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # ValueError: bad UTF-8 or JSON, or an integer past Python's digit limit
        return CORRUPT


def write_error(what: Path, exc: BaseException) -> BatchLLMError:
    """The error a failed write of `what` is reported as: disk full -> TempFailError (exit 75: free space
    and resume), else OutputError."""
    reason = disk_full_reason(exc)
    if reason is not None:
        return TempFailError(
            f"Cannot write {what}: {reason}. Committed rows are kept; {full_disk_fix(reason)} and "
            "run the same command again to resume."
        )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OutputError(f"Cannot write {what}: {reason}.")
