"""The completion marker `OUTPUT.success.json`: written last, it says the output is complete and which
job wrote it (counts, the output's size and sha256, the fingerprint).

A marker only counts when it parses with the right field types and the output beside it still has the
recorded sha256. Hashing costs about 1.3 s per GB here (bench numbers in the README), so the marker also
records the output's stat identity (size, mtime_ns, ctime_ns, inode, device) taken around the hash:
`status` trusts the recorded hash while that identity is unchanged and hashes again otherwise. This is
sound because every write, truncation or replacement of the file changes its ctime or inode, and no
user-space call can set a ctime back (utime sets only atime and mtime). A re-run of `run`, which decides
whether the job is done, always hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm_cli.checkpoint import _CORRUPT, _json_bytes, _read_json, _wrap_write_error, marker_path
from batchllm_cli.durable import atomic_write_bytes, crash_point
from batchllm_cli.errors import OutputError

_HASH_CHUNK = 1 << 20


class MalformedMarker(OutputError):
    """The marker file is not a batchllm marker (garbage, wrong field types); the job counts as unfinished."""


def file_identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """(size, mtime_ns, ctime_ns, inode, device) of a regular file, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def hash_output(path: Path) -> tuple[str, tuple[int, int, int, int, int]]:
    """(sha256, identity) of a file that did not change while it was read."""
    before = file_identity(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    after = file_identity(path)
    if before is None or before != after:
        raise OutputError(f"{path} changed while batchllm was reading it; run the same command again.")
    return h.hexdigest(), after


@dataclass(frozen=True)
class Marker:
    rows: int
    rows_ok: int
    rows_failed: int
    rows_rejected: int
    output_bytes: int
    output_sha256: str
    fingerprint_sha256: str
    finished_at: float
    errors_file: str | None
    rejects_file: str | None
    output_identity: tuple[int, ...] | None  # see the module docstring

    def matches_output(self, output: Path, *, trust_identity: bool = False) -> bool:
        """The output exists and has the recorded sha256 (with trust_identity, an unchanged stat
        identity stands for the hash)."""
        ident = file_identity(output)
        if ident is None or ident[0] != self.output_bytes:
            return False
        if trust_identity and self.output_identity is not None and tuple(ident) == self.output_identity:
            return True
        try:
            return hash_output(output)[0] == self.output_sha256
        except (OSError, OutputError):
            return False


_INT_FIELDS = ("rows", "rows_ok", "rows_failed", "rows_rejected", "output_bytes")
_STR_FIELDS = ("output_sha256", "fingerprint_sha256")


def parse_marker(data: Any) -> Marker | None:
    """The marker's fields with their types checked, or None when any is missing or wrong."""
    if not isinstance(data, dict) or data.get("status") != "finished":
        return None
    ints = [data.get(k) for k in _INT_FIELDS]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
        return None
    if any(not isinstance(data.get(k), str) for k in _STR_FIELDS):
        return None
    finished = data.get("finished_at")
    if isinstance(finished, bool) or not isinstance(finished, (int, float)):
        return None
    files = [data.get(k) for k in ("errors_file", "rejects_file")]
    if any(v is not None and not isinstance(v, str) for v in files):
        return None
    ident = data.get("output_identity")
    if ident is not None and not (isinstance(ident, list) and len(ident) == 5
                                  and all(isinstance(v, int) and not isinstance(v, bool) for v in ident)):
        return None
    return Marker(*ints, data["output_sha256"], data["fingerprint_sha256"], float(finished), *files,
                  tuple(ident) if ident is not None else None)


def read_marker(output: Path) -> Marker | None:
    """None when there is no marker; MalformedMarker (one line) when it is not a valid one."""
    path = marker_path(output)
    data = _read_json(path)
    if data is None:
        return None
    marker = parse_marker(data) if data is not _CORRUPT else None
    if marker is None:
        raise MalformedMarker(f"The completion marker {path} is not a valid batchllm marker (unreadable, or fields "
                              "of the wrong type)")
    return marker


def write_marker(output: Path, data: dict[str, Any]) -> None:
    path = marker_path(output)
    assert parse_marker(json.loads(json.dumps(data))) is not None, data
    try:
        atomic_write_bytes(path, _json_bytes(data))
    except OSError as exc:
        raise _wrap_write_error(path, exc) from exc
    crash_point("marker")
