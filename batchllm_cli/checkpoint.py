"""The run directory: manifest, committed result shards and its lock (taken with file_lock.py); the
files a run keeps beside the output are named in output_files.py.

Layout of a run directory (default `OUTPUT.batchllm/` beside the output):

    manifest.json             the job's fingerprint and totals, written once when the run starts
    lock                      flock()ed by the run working on this directory (empty file)
    shard-000001.parquet      result rows (row id, answer, counts, error), immutable once renamed
    shard-000001.json         its commit record: rows, byte size, sha256, time; written last
    shard-000001-w002.*       a shard committed by worker 2 of a scale-out run (ray_run.py)
    quarantine/               shards found torn or uncommitted on resume (their rows are recomputed)

The directory is batchllm's alone: a run refuses a directory that holds anything else (`check_owned`),
and cleanup removes only the files named above, by name, never recursively; the directory itself goes
only when this job created it (recorded in the manifest as `dir_created`) and nothing else is left.

A shard is committed when its commit record is durable and matches the shard's bytes: write temp ->
fsync -> rename -> fsync dir, for the shard and then for its record. On resume every record is checked
against its shard (size and sha256); a shard without a valid record, or whose bytes do not match
(truncated, garbage appended, deleted), is moved to quarantine/ and its rows run again.
"""
from __future__ import annotations

import hashlib
import os
import re
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
from batchllm_cli.durable import (
    CORRUPT,
    atomic_write_bytes,
    crash_point,
    fsync_dir,
    json_bytes,
    make_dirs,
    read_json,
    remove_dirs,
    remove_durably,
    write_error,
)
from batchllm_cli.errors import OutputError, UsageError
from batchllm_cli.file_lock import FileLock
from batchllm_cli.table_io import ROW_ID

MANIFEST = "manifest.json"
RUN_LOCK = "lock"
QUARANTINE = "quarantine"
MANIFEST_FORMAT = 1
_SHARD_RE = re.compile(r"^shard-(\d{6,})(?:-w(\d{3,}))?\.(parquet|json)$")
# Names batchllm gives files in a run directory: the manifest, the lock, shards and their records, and
# their temporary names (durable.temp_name); in quarantine/, a shard's name plus a stamp.
_RUN_FILE_RE = re.compile(
    r"^(manifest\.json|lock|shard-\d{6,}(-w\d{3,})?\.(parquet|json)"
    r"|\.(manifest\.json|shard-\d{6,}(-w\d{3,})?\.(parquet|json))\.[0-9a-f]{12}\.tmp)$"
)
_QUARANTINED_RE = re.compile(r"^shard-\d{6,}(-w\d{3,})?\.(parquet|json)\.\d{8}T\d{6}\.[0-9a-f]{6}$")


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
        data = read_json(self.manifest_path)
        if data is None:
            return None
        if data is CORRUPT or not isinstance(data, dict) or not isinstance(data.get("fingerprint"), dict):
            raise OutputError(
                f"The checkpoint manifest {self.manifest_path} cannot be read; run with --restart to "
                "discard the checkpoint and start over."
            )
        return data

    def create(self, fingerprint: dict[str, Any], info: dict[str, Any], *, dir_created: bool,
               parents_created: list[Path] | None = None) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "run_id": uuid.uuid4().hex,
            "created_at": time.time(),
            "batchllm_version": __version__,
            "dir_created": dir_created,  # remove() deletes the directory only when a run created it
            # and the missing parents it made for it (outermost first), removed too when left empty
            "parents_created": [str(p) for p in parents_created or []],
            "fingerprint": fingerprint,
            **info,
        }
        try:
            atomic_write_bytes(self.manifest_path, json_bytes(manifest))
        except OSError as exc:
            raise write_error(self.manifest_path, exc) from exc

    # -- lock ----------------------------------------------------------------------------------------
    def lock(self) -> None:
        self._lock.acquire(f"the checkpoint {self.path}")

    def unlock(self) -> None:
        self._lock.release()

    # -- lifecycle -----------------------------------------------------------------------------------
    def foreign_entries(self) -> list[str]:
        """Names in the directory that batchllm did not create (empty when it does not exist)."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UsageError(f"Cannot read the checkpoint directory {self.path}: {exc.strerror or exc}.") from exc
        foreign = []
        for e in entries:
            # batchllm creates regular files and quarantine/ only: a symlink is never its own.
            if e.name == QUARANTINE and e.is_dir(follow_symlinks=False):
                foreign += [f"{QUARANTINE}/{q.name}" for q in os.scandir(e.path)
                            if not (_QUARANTINED_RE.match(q.name) and q.is_file(follow_symlinks=False))]
            elif not (_RUN_FILE_RE.match(e.name) and e.is_file(follow_symlinks=False)):
                foreign.append(e.name)
        return sorted(foreign)

    def check_owned(self) -> None:
        """UsageError unless the path is free, or a directory holding only a batchllm run's files."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"Checkpoint directory {self.path} exists and is not a directory.")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UsageError(
                f"Checkpoint directory {self.path} holds files that are not batchllm's ({shown}); give "
                "--checkpoint-dir a new or empty directory of its own."
            )

    def ensure(self) -> list[Path]:
        """Create the directory and its missing parents if needed; the ones this call created, outermost
        first (empty when the directory existed)."""
        try:
            return make_dirs(self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def created_by_batchllm(self) -> bool:
        """The manifest (of this or an earlier run) says a run created the directory."""
        return self._made_by_a_run()[0]

    def parents_created(self) -> list[Path]:
        """The parents a run created for the directory (per the manifest), outermost first."""
        return self._made_by_a_run()[1]

    def _made_by_a_run(self) -> tuple[bool, list[Path]]:
        """(the directory, its parents) a run created, as the manifest records them (one read)."""
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict):
            return False, []
        found = manifest.get("parents_created")
        parents = [Path(p) for p in found if isinstance(p, str)] if isinstance(found, list) else []
        return manifest.get("dir_created") is True, parents

    def has_shards(self) -> bool:
        """Whether any result shard or commit record is in the directory (committed work to protect)."""
        return any(_SHARD_RE.match(p.name) for p in self.path.iterdir())

    def _own_files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if _RUN_FILE_RE.match(p.name) and not p.is_dir()]

    def _remove_quarantine(self) -> None:
        qdir = self.path / QUARANTINE
        if not qdir.is_dir() or qdir.is_symlink():
            return
        remove_durably([q for q in qdir.iterdir() if _QUARANTINED_RE.match(q.name) and not q.is_dir()])
        try:
            qdir.rmdir()  # only if nothing else is in it
        except OSError:
            pass

    def wipe(self) -> None:
        """Discard the old run's files, by name (the lock file stays: we hold it)."""
        self._remove_quarantine()
        remove_durably([p for p in self._own_files() if p.name != RUN_LOCK])
        fsync_dir(self.path)

    def remove(self) -> None:
        """Delete the run's files (after the completion marker is durable), and the directory itself when
        this job created it and nothing else is in it."""
        created, parents = self._made_by_a_run()
        self._remove_quarantine()
        # The manifest goes last: a kill during the cleanup leaves it while anything else is left, so the
        # next run knows whose directory it is and finishes the cleanup.
        remove_durably([p for p in self._own_files() if p.name != MANIFEST])
        crash_point("cleanup")
        remove_durably([self.manifest_path])
        crash_point("cleanup_manifest")
        if created:
            try:
                self.path.rmdir()
                remove_dirs(parents)  # only while empty, innermost first
            except OSError:
                pass
        parent = self.path.parent
        while not parent.exists():  # removed with the directory
            parent = parent.parent
        fsync_dir(parent)

    def remove_leftover(self, remove_dir: bool) -> None:
        """Delete what a finished job's cleanup, cut short after its manifest went, left (batchllm's
        files by name, never anything else), and the directory itself with `remove_dir` once empty."""
        self._remove_quarantine()
        remove_durably(self._own_files())
        if remove_dir:
            try:
                self.path.rmdir()
            except OSError:
                pass
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
        # keyed by (seq, worker): -1 for the single-process run's own shards
        records: dict[tuple[int, int], Path] = {}
        shards: dict[tuple[int, int], Path] = {}
        max_seq = 0
        leftovers: list[Path] = []
        for p in self.path.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                seq = int(m.group(1))
                max_seq = max(max_seq, seq)
                key = (seq, int(m.group(2)) if m.group(2) else -1)
                (shards if m.group(3) == "parquet" else records)[key] = p
            elif p.name.startswith(".shard-") and _RUN_FILE_RE.match(p.name):
                leftovers.append(p)  # a shard or record that never got renamed: never committed
        qdir = self.path / QUARANTINE
        if qdir.is_dir():
            for q in qdir.iterdir():
                m = re.match(r"^shard-(\d{6,})[.-]", q.name)
                if m:
                    max_seq = max(max_seq, int(m.group(1)))
        for p in leftovers:
            p.unlink()
        bad: list[Path] = []
        for key in sorted(set(records) | set(shards)):
            record, shard = records.get(key), shards.get(key)
            info = self._verify(key[0], record, shard, committed.done)
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
        meta = parse_commit_record(read_json(record))
        if meta is None or meta["shard"] != shard.name:
            return None
        try:
            data = shard.read_bytes()
        except OSError:
            return None
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return None
        try:
            ids = pq.read_table(pa.BufferReader(data), columns=[ROW_ID]).column(ROW_ID).to_numpy()
        except (pa.ArrowException, OSError, ValueError):
            return None
        if len(ids) != meta["rows"] or (len(ids) and (ids.min() < 0 or ids.max() >= len(done))):
            return None
        if done[ids].any():  # rows already committed by another shard: keep the first copy
            return None
        done[ids] = True
        return ShardInfo(
            seq=seq,
            name=shard.name,
            rows=meta["rows"],
            errors=meta["errors"],
            bytes=len(data),
            sha256=meta["sha256"],
            committed_at=meta["committed_at"],
            prompt_tokens=meta["prompt_tokens"],
            completion_tokens=meta["completion_tokens"],
        )

    def commit_shard(self, table: pa.Table, seq: int, worker: int | None = None) -> ShardInfo:
        """Make `table` (SHARD_SCHEMA) a committed shard; durable when this returns. A scale-out
        worker's shard names carry its number, so workers starting at the same `seq` never collide."""
        assert table.schema.equals(SHARD_SCHEMA), table.schema
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        stem = f"shard-{seq:06d}" + (f"-w{worker:03d}" if worker is not None else "")
        shard = self.path / f"{stem}.parquet"
        record = self.path / f"{stem}.json"
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
            atomic_write_bytes(record, json_bytes(meta))
        except OSError as exc:
            raise write_error(shard, exc) from exc
        crash_point("manifest_update")
        return info

    def drop_error_rows(self, committed: Committed) -> int:
        """Un-commit the rows in error (--retry-errors); returns how many. Each shard holding some is
        replaced by a new shard of its other rows, committed before the old one is removed: a crash
        half-way leaves both, and load_committed keeps the older copy and quarantines the newer."""
        dropped, kept = 0, []
        for info in committed.shards:
            if not info.errors:
                kept.append(info)
                continue
            table = pq.read_table(self.path / info.name)
            failed = pc.is_valid(table.column("error"))
            if table.num_rows - info.errors:
                kept.append(self.commit_shard(table.filter(pc.invert(failed)), committed.next_seq))
                committed.next_seq += 1
            remove_durably([self.path / Path(info.name).with_suffix(".json").name, self.path / info.name])
            committed.done[table.filter(failed).column(ROW_ID).to_numpy()] = False
            dropped += info.errors
        committed.shards = kept
        return dropped

    def shard_files(self, committed: Committed) -> list[Path]:
        return [self.path / s.name for s in committed.shards]


# Fields of a commit record and their types (bool is not an int here: JSON true is no row count).
_RECORD_FIELDS: dict[str, type] = {
    "shard": str, "rows": int, "errors": int, "bytes": int, "sha256": str,
    "prompt_tokens": int, "completion_tokens": int, "committed_at": float,
}


def parse_commit_record(data: Any) -> dict[str, Any] | None:
    """A commit record with every field of the right type, or None (garbage, wrong types)."""
    if not isinstance(data, dict):
        return None
    out: dict[str, Any] = {}
    for name, typ in _RECORD_FIELDS.items():
        value = data.get(name, 0 if name in ("errors", "prompt_tokens", "completion_tokens") else None)
        if isinstance(value, bool) or not isinstance(value, (int, float) if typ is float else typ):
            return None
        if typ is int and value < 0:
            return None
        out[name] = float(value) if typ is float else value
    return out


def read_commit_records(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Commit records as they are (no hashing), for `status`, which must be cheap: (valid records whose
    shard exists, number of malformed records)."""
    out, malformed = [], 0
    for p in sorted(run_dir.glob("shard-*.json")):
        data = parse_commit_record(read_json(p))
        if data is None:
            malformed += 1
        elif (run_dir / data["shard"]).is_file():
            out.append(data)
    return out, malformed
