"""The checkpoint building blocks without a model: atomic writes, shard commit and verification,
locks, fingerprints, the crash hook."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm_cli import durable
from batchllm_cli.checkpoint import RunDir
from batchllm_cli.file_lock import FileLock, LockHeld
from batchllm_cli.collector import SHARD_SCHEMA, ResultCollector
from batchllm_cli.fingerprint import changed_fields, describe_changes, digest_of


def shard(rows: range) -> pa.Table:
    c = ResultCollector()
    for i in rows:
        if i % 5 == 4:
            c.add_failure(i, f"bad {i}", "template_error")
        else:
            c._append((i, f"t{i}", "length", 3, 2, None, None, False))
    return c.drain()


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    durable.atomic_write_bytes(p, b"one")
    durable.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_crash_hook_exits_abruptly_at_the_nth_pass(tmp_path: Path) -> None:
    code = (
        "from batchllm_cli.durable import crash_point\n"
        "for i in range(5):\n"
        "    crash_point('shard_rename'); print(i, flush=True)\n"
    )
    env = {**os.environ, "BATCHLLM_CRASH_AT": "shard_write:1,shard_rename:3"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == durable.CRASH_EXIT_CODE
    assert r.stdout.split() == ["0", "1"]


def test_commit_and_verify_shards(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.ensure()
    info1 = rd.commit_shard(shard(range(0, 10)), 1)
    rd.commit_shard(shard(range(10, 20)), 2)
    assert (info1.rows, info1.errors) == (10, 2)
    temp = durable.temp_name(rd.path / "shard-000003.parquet")
    temp.write_bytes(b"half")  # never renamed
    (rd.path / "shard-000003.parquet").write_bytes(b"renamed, never committed")
    committed = rd.load_committed(30)
    assert [s.seq for s in committed.shards] == [1, 2]
    assert committed.done.tolist() == [True] * 20 + [False] * 10
    assert committed.next_seq == 4  # never reuse a name, even a quarantined one
    assert committed.quarantined == ["shard-000003.parquet"]
    assert not temp.exists()


def test_shard_with_rows_outside_the_table_or_duplicated_is_not_trusted(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.ensure()
    rd.commit_shard(shard(range(0, 10)), 1)
    rd.commit_shard(shard(range(5, 15)), 2)  # overlaps shard 1 (cannot happen, but must not duplicate)
    committed = rd.load_committed(12)  # rows 12..14 do not exist in this table
    assert [s.seq for s in committed.shards] == [1]
    assert sorted(committed.quarantined) == ["shard-000002.json", "shard-000002.parquet"]


def test_shard_schema_is_enforced(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.ensure()
    with pytest.raises(AssertionError):
        rd.commit_shard(pa.table({"x": [1]}), 1)
    assert ResultCollector().drain().schema.equals(SHARD_SCHEMA)


def _hold_lock(path: Path) -> subprocess.Popen:
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet.lock"
    holder = _hold_lock(path)
    try:
        t = time.monotonic()
        with pytest.raises(LockHeld, match="Another batchllm run"):
            FileLock(path).acquire("out.parquet")
        assert time.monotonic() - t < 1
    finally:
        holder.kill()
        holder.wait()
    lock = FileLock(path, remove_on_release=True)
    lock.acquire("out.parquet")  # the holder died: the kernel dropped its flock
    lock.record_owner()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_refused_lock_owner_message_and_untouched_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "o.lock"
    path.write_text('{"pid": 1234, "host": "h"}\n')
    lock = FileLock(path, remove_on_release=True)
    lock.acquire("o")
    lock.release()  # not recorded into: a stale lock stays as it was
    assert path.read_text() == '{"pid": 1234, "host": "h"}\n'
    holder = _hold_lock(path)
    try:
        with pytest.raises(LockHeld, match=r"\(pid 1234 on h\)"):
            FileLock(path).acquire("o")
    finally:
        holder.kill()
        holder.wait()


def test_fingerprint_changes_are_named() -> None:
    old = {"template": "a", "max_tokens": 3, "input.mtime": 1, "stop": ["x"]}
    new = {"template": "b", "max_tokens": 4, "input.mtime": 2, "stop": ("x",)}
    fields = changed_fields(old, new)
    assert fields == ["template", "max_tokens"]  # mtime is informational; tuple == list
    assert describe_changes(old, new, fields) == "template text, --max-tokens (3 -> 4)"
    assert digest_of(old | {"template": "b", "max_tokens": 4}) == digest_of(new)
    assert changed_fields({"a": 1}, {"a": 1, "b": 2}) == ["b"]
