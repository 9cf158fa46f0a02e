"""Disk full and read-only output locations, on a small real tmpfs (needs root with CAP_SYS_ADMIN;
skipped with the reason otherwise). A full disk exits 75 with a clear message, never leaves a torn or
temporary file at the output, and the same command resumes once space is freed. The same holds for a
full temporary directory ($TMPDIR: the token spool, DuckDB's spill files), also when the limit is the
process's file size limit (`ulimit -f`, EFBIG), which needs no root."""
from __future__ import annotations

import base64
import csv
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import cli_process
from reliability_utils import (
    FAST,
    assert_finished_cleanly,
    committed_row_ids,
    flat,
    invoke,
    job_args,
    one_error_line,
    read_rows,
    write_rows_csv,
    write_template,
)

REPO = Path(__file__).resolve().parent.parent
# A long instruction every row shares (one prefix: cheap to run) makes the token spool large, ~4 bytes
# per prompt token, while the checkpoint's shards stay small.
LONG_TEMPLATE = "Read the review below and answer in one short word. " * 6 + "Review: {{ text }}"

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


def _run_with_file_size_limit(args: list[str], env: dict[str, str], limit: int) -> subprocess.CompletedProcess:
    """`python -m batchllm_cli ARGS` in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE,
    as `ulimit -f`: a write past it fails with EFBIG, Python ignoring SIGXFSZ)."""
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full_env = {**os.environ, **env, "COLUMNS": "1000", "NO_COLOR": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "batchllm_cli", *args], env=full_env, preexec_fn=set_limit,
                          capture_output=True, text=True, timeout=600)


def test_temp_directory_over_the_file_size_limit_exits_75_keeping_rows_then_resume(
        tmp_path: Path, env: dict[str, str]) -> None:
    n = 200
    inp = write_rows_csv(tmp_path / "in.csv", n)
    tpl = write_template(tmp_path / "t.j2", LONG_TEMPLATE)
    ref = tmp_path / "ref.parquet"
    assert invoke(job_args(inp, tpl, ref)).exit_code == 0
    out = tmp_path / "out.parquet"
    args = job_args(inp, tpl, out, "--checkpoint-rows", "30", "--checkpoint-seconds", "1000", "-q")
    # Two shards committed, then killed: the rows a full temporary directory must not lose.
    crash_tmp = tmp_path / "crash-tmp"
    crash_tmp.mkdir()
    code, log = cli_process.run(args, {**env, "TMPDIR": str(crash_tmp), "BATCHLLM_CRASH_AT": "manifest_update:2"},
                                tmp_path / "crash.log")
    assert code == 137, log
    run_dir = out.with_name(out.name + ".batchllm")
    assert len(committed_row_ids(run_dir)) == 60
    temp = tmp_path / "tmp"
    temp.mkdir()
    # The rest's spool is 140 rows x ~350 tokens x 4 bytes, past 64 KiB; shards and manifest are not.
    result = _run_with_file_size_limit(args, {**env, "TMPDIR": str(temp)}, 64 << 10)
    assert result.returncode == 75, result.stderr
    line = one_error_line(result.stderr)
    assert str(temp) in line and "file too large" in line and "ulimit -f" in line and "TMPDIR" in line, line
    assert "run the same command again" in line
    assert list(temp.iterdir()) == []  # the spool is removed
    assert len(committed_row_ids(run_dir)) == 60
    no_temp_or_torn_output(out)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert f"60 of {n} rows already done" in flat(result.stderr)
    assert read_rows(out) == read_rows(ref)
    assert_finished_cleanly(out, n)


def test_full_temp_directory_while_spooling_tokens_exits_75(
        tmpfs: Path, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    n = 200
    inp = write_rows_csv(tmp_path / "in.csv", n)
    tpl = write_template(tmp_path / "t.j2", LONG_TEMPLATE)
    out = tmp_path / "out.parquet"
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (160 - 40) * 1024)  # ~40 KiB left: less than the spool's ~280 KB
    monkeypatch.setenv("TMPDIR", str(tmpfs))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    result = invoke(job_args(inp, tpl, out, "-q"))
    assert result.exit_code == 75, result.output
    line = one_error_line(result.stderr)
    assert str(tmpfs) in line and "no space left on device" in line and "TMPDIR" in line, line
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]
    no_temp_or_torn_output(out)
    filler.unlink()
    remount(tmpfs, "size=4m")  # room for the spool
    result = invoke(job_args(inp, tpl, out, "-q"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmpfs.iterdir()) == []
    assert_finished_cleanly(out, n)
