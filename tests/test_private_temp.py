"""batchllm's own temporary files: DuckDB spills into a private directory (never `.tmp` in the user's
current directory), and private directories a killed run left behind (links, spill files, the plan's
token spool) are removed by the next run."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import cli_process
from batchllm_cli import plain_paths
from batchllm_cli.plain_paths import PlainPaths
from batchllm_cli.table_io import _connect
from reliability_utils import job_args, write_rows_csv, write_template


def test_duckdb_spills_into_a_private_directory_not_the_current_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plain = PlainPaths()
    con = _connect(plain)
    try:
        spill = con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]
        con.execute("SET memory_limit = '30MB'")
        con.execute("SET threads = 1")
        rows = con.sql("SELECT count(*) FROM (SELECT i, random() AS r FROM range(3000000) t(i) ORDER BY r)").fetchall()
        assert rows == [(3000000,)]
        assert Path(spill).is_dir()  # the sort spilled (DuckDB makes the directory when it does)
        assert list(tmp_path.iterdir()) == []  # and not into `.tmp` beside the user's files
    finally:
        con.close()
    assert not Path(spill).exists()  # DuckDB removes its spill files on close
    assert Path(spill).parent.name.startswith(f"batchllm-{plain_paths._pid_namespace()}-{os.getpid()}-")
    assert oct(Path(spill).parent.stat().st_mode & 0o777) == "0o700"
    plain.close()
    assert not Path(spill).parent.exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_private_dirs_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    ns = plain_paths._pid_namespace()
    target = tmp_path / "user.csv"
    target.write_text("keep me")
    stale = tmp_path / f"batchllm-{ns}-{_dead_pid()}-abc123"
    live = tmp_path / f"batchllm-{ns}-{os.getppid()}-def456"
    other_ns = tmp_path / f"batchllm-1{ns}-{_dead_pid()}-ghi789"
    unrelated = tmp_path / "batchllm-analyze-xyz"
    for d in (stale, live, other_ns, unrelated):
        d.mkdir()
        (d / "input.csv").symlink_to(target)
    (stale / "duckdb-0").mkdir()
    (stale / "duckdb-0" / "spill.block").write_bytes(b"x" * 10)
    assert plain_paths.remove_stale_dirs(str(tmp_path)) == [stale]
    assert not stale.exists()
    assert live.exists() and other_ns.exists() and unrelated.exists()
    assert target.read_text() == "keep me"  # links are removed, never followed


def _wait_for(found: Callable[[], list[Path]], p: cli_process.CliProcess, timeout: float = 120) -> list[Path]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.running:
        if paths := found():
            return paths
        time.sleep(0.02)
    pytest.fail(f"never appeared; log:\n{p.output}")


def test_a_killed_runs_token_spool_is_removed_by_the_next_run_and_a_live_runs_kept(
        tmp_path: Path, env: dict[str, str]) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    inp = write_rows_csv(tmp_path / "in.csv", 2000)
    tpl = write_template(tmp_path / "t.j2")
    job_env = {**env, "TMPDIR": str(temp)}
    p = cli_process.start(job_args(inp, tpl, tmp_path / "out.parquet"), job_env, tmp_path / "run.log")
    spools = _wait_for(lambda: list(temp.glob("*/tokens.i32")), p)
    p.kill()  # kill -9: no cleanup runs
    assert p.wait() == 137
    assert all(s.exists() for s in spools)
    # Another batchllm process, alive, with its own private directory: never touched.
    live = temp / f"batchllm-{plain_paths._pid_namespace()}-{os.getpid()}-live01"
    live.mkdir()
    (live / "tokens.i32").write_bytes(b"\0" * 16)
    # The next batchllm command using this temp directory, of any job, removes what the killed run left.
    code, log = cli_process.run(["render", str(inp), "-t", str(tpl), "--limit", "1"], job_env, tmp_path / "render.log")
    assert code == 0, log
    assert sorted(temp.iterdir()) == [live]
    assert (live / "tokens.i32").exists()


_SPILLING_SORT = "SELECT count(*) FROM (SELECT i, random() AS r FROM range(3000000) t(i) ORDER BY r)"


def test_duckdb_spill_files_past_the_file_size_limit_name_the_temp_directory(tmp_path: Path) -> None:
    """A DuckDB query whose spill files do not fit (here: RLIMIT_FSIZE, as `ulimit -f`) is a full temp
    directory (exit 75, naming it and TMPDIR), not a fault of the output being written."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = f"""
import resource
from pathlib import Path
from batchllm_cli.plain_paths import PlainPaths
from batchllm_cli.table_io.common import _connect, _write_error
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
plain = PlainPaths()
con = _connect(plain)
con.execute("SET memory_limit = '30MB'")
con.execute("SET threads = 1")
try:
    con.sql({_SPILLING_SORT!r}).fetchall()
except Exception as exc:
    err = _write_error(Path("/elsewhere/out.parquet"), exc)
    print(type(err).__name__, err.exit_code, err)
con.close()
plain.close()
"""
    repo = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = f"TempFailError 75 Cannot write to the temporary directory {temp}: file too large;"
    assert proc.stdout.startswith(expected), proc.stdout
    assert "ulimit -f" in proc.stdout and "TMPDIR" in proc.stdout
    assert list(temp.iterdir()) == []


def test_which_disk_full_errors_are_the_temp_directorys() -> None:
    full = "No space left on device"
    spill = OSError(f'IO Error: Could not write file "/data/tmp/batchllm-1-42-ab_c1/duckdb-spill-1/t.tmp": {full}')
    error = plain_paths.temp_full_error(spill)
    assert error is not None and error.exit_code == 75 and "temporary directory /data/tmp: no space left" in str(error)
    # DuckDB refusing to spill for want of room says so without a path.
    no_room = RuntimeError("Out of Memory Error: failed to offload data block of size 256.0 KiB (0 bytes/90.0 KiB used).")
    assert plain_paths.temp_full_error(no_room) is not None
    # The output, written by DuckDB through a link in a private directory, is not the temp directory.
    output = OSError(f'IO Error: Could not write file "/tmp/batchllm-1-42-ab_c1/output.parquet": {full}')
    assert plain_paths.temp_full_error(output) is None
    private = Path("/var/tmp/batchllm-1-2-a")  # a directory the caller wrote into
    assert plain_paths.temp_full_error(OSError(errno.EACCES, "Permission denied"), private) is None
    big = plain_paths.temp_full_error(OSError(errno.EFBIG, "File too large"), private)
    assert big is not None and "/var/tmp: file too large; raise the file size limit (ulimit -f)" in str(big)
