"""Disk full and read-only output locations, on a small real tmpfs (needs root with CAP_SYS_ADMIN;
skipped with the reason otherwise). A full disk exits 75 with a clear message, never leaves a torn or
temporary file at the output, and the same command resumes once space is freed."""
from __future__ import annotations

import base64
import csv
import os
import subprocess
from pathlib import Path

import pytest

import cli_process
from reliability_utils import (
    FAST,
    assert_finished_cleanly,
    committed_row_ids,
    flat,
    invoke,
    read_rows,
    write_rows_csv,
    write_template,
)

def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path: Path):  # noqa: ANN201
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (real ENOSPC / EROFS) needs root")
    r = _mount("-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt: Path, options: str) -> None:
    r = _mount("-o", f"remount,{options}", str(mnt))
    assert r.returncode == 0, r.stderr


def no_temp_or_torn_output(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_committing_shards_then_resume(tmpfs: Path, tmp_path: Path, env: dict[str, str]) -> None:
    n = 240
    inp = write_rows_csv(tmp_path / "in.csv", n)
    tpl = write_template(tmp_path / "t.j2")
    ref = tmp_path / "ref.parquet"
    args = ["--checkpoint-rows", "30", "--checkpoint-seconds", "1000", "--keep-checkpoints"]
    assert invoke(["run", str(inp), "-t", str(tpl), "-o", str(ref), *FAST, *args]).exit_code == 0
    out = tmpfs / "out.parquet"
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (160 - 40) * 1024)  # ~40 KiB left: a handful of shards fit
    cmd = ["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, *args]
    result = invoke(cmd)
    assert result.exit_code == 75, result.output
    message = flat(result.stderr)
    assert "no space left on device" in message and "run the same command again to resume" in message
    no_temp_or_torn_output(out)
    run_dir = out.with_name(out.name + ".batchllm")
    done = committed_row_ids(run_dir)
    assert 0 < len(done) < n and len(set(done)) == len(done)
    filler.unlink()
    result = invoke(cmd)
    assert result.exit_code == 0, result.output
    assert f"{len(done)} of {n} rows already done" in flat(result.stderr)
    assert read_rows(out) == read_rows(ref)
    assert_finished_cleanly(out, n, keep_checkpoints=True)


def test_disk_full_while_writing_the_output_then_resume(tmpfs: Path, tmp_path: Path, env: dict[str, str]) -> None:
    # A wide input column (not in the template) makes the output much bigger than the shards.
    n = 100
    inp = tmp_path / "in.csv"
    with inp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "blob"])
        for i in range(n):
            w.writerow([i, f"r{i}", base64.b64encode(os.urandom(1500)).decode()])
    tpl = write_template(tmp_path / "t.j2")
    ref = tmp_path / "ref.parquet"
    assert invoke(["run", str(inp), "-t", str(tpl), "-o", str(ref), *FAST]).exit_code == 0
    out = tmpfs / "out.parquet"
    cmd = ["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, "--checkpoint-rows", "50"]
    result = invoke(cmd)
    assert result.exit_code == 75, result.output
    assert "no space left on device" in flat(result.stderr)
    no_temp_or_torn_output(out)
    assert not out.with_name(out.name + ".success.json").exists()
    assert sorted(committed_row_ids(out.with_name(out.name + ".batchllm"))) == list(range(n))
    remount(tmpfs, "size=4m")  # the disk grows
    result = invoke(cmd)
    assert result.exit_code == 0, result.output
    assert f"{n} of {n} rows already done" in flat(result.stderr)
    assert read_rows(out) == read_rows(ref)
    assert_finished_cleanly(out, n)


def test_read_only_output_location(tmpfs: Path, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    n = 90
    inp = write_rows_csv(tmp_path / "in.csv", n)
    tpl = write_template(tmp_path / "t.j2")
    ref = tmp_path / "ref.parquet"
    assert invoke(["run", str(inp), "-t", str(tpl), "-o", str(ref), *FAST]).exit_code == 0
    out = tmpfs / "job" / "out.parquet"
    cmd = ["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, "--checkpoint-rows", "30", "--checkpoint-seconds", "1000"]

    import engine.llm_engine

    init = engine.llm_engine.LLMEngine.__init__
    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    remount(tmpfs, "ro")
    result = invoke(cmd)
    assert result.exit_code == 2, result.output
    assert "is not writable: Read-only file system" in flat(result.stderr)
    remount(tmpfs, "rw")
    assert not list(tmpfs.iterdir())  # nothing was created

    # Part of the job committed, then the location turns read-only: refused before the model, the
    # checkpoint kept; writable again, the same command resumes.
    code, log = cli_process.run(cmd[:], {**env, "BATCHLLM_CRASH_AT": "manifest_update:2"})
    assert code == 137, log
    remount(tmpfs, "ro")
    result = invoke(cmd)
    assert result.exit_code == 2 and "Read-only file system" in flat(result.stderr)
    remount(tmpfs, "rw")
    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", init)
    result = invoke(cmd)
    assert result.exit_code == 0, result.output
    assert f"60 of {n} rows already done" in flat(result.stderr)
    assert read_rows(out) == read_rows(ref)
    assert_finished_cleanly(out, n)
