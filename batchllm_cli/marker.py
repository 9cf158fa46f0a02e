"""The completion marker `OUTPUT.success.json`: written last, it says the output is complete and which
job wrote it (counts, the output's size and sha256, the fingerprint).

A marker only counts when it parses with the right field types and the output beside it still has the
recorded sha256. Both `status` and a re-run of `run` hash the output (sha256 streams at about 0.7-0.8
GB/s on the shared test machine: bench/hash_cost.md). A stat identity cached in the marker cannot stand
in for the hash here: the output's ctime is its rename, a moment before the marker is written, so a
same-size rewrite within the same timestamp tick would go unseen (see fingerprint.file_identity).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm_cli.durable import CORRUPT, json_bytes, read_json, write_error
from batchllm_cli.durable import atomic_write_bytes, crash_point
from batchllm_cli.errors import OutputError
from batchllm_cli.fingerprint import file_identity
from batchllm_cli.output_files import marker_path

_HASH_CHUNK = 1 << 20


class MalformedMarker(OutputError):
    """The marker file is not a batchllm marker (garbage, wrong field types); the job counts as unfinished."""


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
    fingerprint: dict[str, Any] | None = None  # the job's fields, to say what a new job changed
    # For the summary of a re-run (absent from markers written before they were recorded):
    chat: bool | None = None
    model: dict[str, Any] | None = None  # the engine's model info (attention backend, CUDA graphs, ...)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The output's shape: its answer columns' prefix (--column). Not in the fingerprint (a resume may
    # change it), so a re-run with another one must rewrite the output rather than call it finished.
    column: str | None = None

    def matches_output(self, output: Path) -> bool:
        """The output exists and has the recorded sha256."""
        ident = file_identity(output)
        if ident is None or ident[0] != self.output_bytes:
            return False
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
    fingerprint = data.get("fingerprint") if isinstance(data.get("fingerprint"), dict) else None
    chat = data.get("chat") if isinstance(data.get("chat"), bool) else None
    model = data.get("model") if isinstance(data.get("model"), dict) else None
    tokens = [data.get(k) for k in ("prompt_tokens", "completion_tokens")]
    tokens = [v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None for v in tokens]
    column = data.get("column") if isinstance(data.get("column"), str) and data.get("column") else None
    return Marker(*ints, data["output_sha256"], data["fingerprint_sha256"], float(finished), *files, fingerprint,
                  chat, model, *tokens, column)


def read_marker(output: Path) -> Marker | None:
    """None when there is no marker; MalformedMarker (one line) when it is not a valid one."""
    path = marker_path(output)
    data = read_json(path)
    if data is None:
        return None
    marker = parse_marker(data) if data is not CORRUPT else None
    if marker is None:
        raise MalformedMarker(f"The completion marker {path} is not a valid batchllm marker (unreadable, or fields "
                              "of the wrong type)")
    return marker


def write_marker(output: Path, data: dict[str, Any]) -> None:
    path = marker_path(output)
    assert parse_marker(json.loads(json.dumps(data))) is not None, data
    try:
        atomic_write_bytes(path, json_bytes(data))
    except OSError as exc:
        raise write_error(path, exc) from exc
    crash_point("marker")
