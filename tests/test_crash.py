"""Crash safety of `batchllm run`: killed at random moments and at every commit step, it resumes to the
output of an uninterrupted run.

The CLI runs in real processes (see cli_process.py: forked from a preloaded server, so a restart costs
well under a second instead of ten); test_entry_point_sigterm_and_kill_then_resume additionally starts
`python -m batchllm_cli` itself.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli_process
from batchllm_cli.durable import CRASH_EXIT_CODE, CRASH_POINTS
from reliability_utils import (
    SEEDED,
    assert_finished_cleanly,
    committed_row_ids,
    invoke,
    job_args,
    read_rows,
    write_rows_csv,
    write_template,
)

SWEEP_ROWS = 4000
# small steps (<= 64 rows each), so a commit holds a few dozen rows and ten kills leave work to do
SWEEP_STEP = ["--max-batch-tokens", "64"]
# long enough that a signal sent a second into generation finds rows still to do (~5 s at 1,500 rows/s)
SIGNAL_ROWS = 8000
KILLS_PER_MODE = 10  # x 2 modes = 20 kills; kills 3 and 7 of each mode are SIGTERM, the rest SIGKILL
SIGTERM_AT = (3, 7)


def run_ok(args: list[str], env: dict[str, str]) -> str:
    code, out = cli_process.run(args, env)
    assert code == 0, out
    return out


def _wait_for_commits(p: cli_process.CliProcess, run_dir: Path, more: int, timeout: float = 60.0) -> None:
    target = len(list(run_dir.glob("shard-*.json"))) + more
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.running and len(list(run_dir.glob("shard-*.json"))) < target:
        time.sleep(0.005)


def _wait_for_generation(p: cli_process.CliProcess, timeout: float = 60.0) -> None:
    """Until the run has loaded the model and started on the rows (or has ended)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.running and " rows to process" not in p.output:
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_kill_sweep_resumes_to_the_uninterrupted_output(tmp_path: Path, env: dict[str, str], mode: str) -> None:
    rng = random.Random(f"sweep-{mode}")
    inp = write_rows_csv(tmp_path / "in.csv", SWEEP_ROWS)
    tpl = write_template(tmp_path / "t.j2")
    extra = [*(SEEDED if mode == "seeded" else []), *SWEEP_STEP, "--checkpoint-rows", "40", "--checkpoint-seconds", "0.25"]
    ref = tmp_path / "ref" / "out.parquet"
    run_ok(job_args(inp, tpl, ref, *extra), env)

    out = tmp_path / "job" / "out.parquet"
    run_dir = out.with_name(out.name + ".batchllm")
    args = job_args(inp, tpl, out, *extra, "--keep-checkpoints")
    kills = 0
    progress: list[int] = []  # committed shards after each kill
    for i in range(KILLS_PER_MODE):
        p = cli_process.start(args, env, tmp_path / f"run{i}.log")
        # Random moments over the life of a run: mostly while rows are generated and shards committed
        # (each run gets a few percent of the job done before it dies), sometimes during start-up.
        # Paced by commits rather than by the clock, so the machine's speed does not matter: after
        # 1-2 more commits plus a random part of a commit interval (10 kills leave work to do).
        if rng.random() < 0.8:
            _wait_for_generation(p)
            _wait_for_commits(p, run_dir, rng.randint(1, 2))
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        sig = signal.SIGTERM if i in SIGTERM_AT else signal.SIGKILL
        t_kill = time.monotonic()
        p.kill(sig)
        code = p.wait(timeout=60)
        kills += 1
        if sig == signal.SIGTERM:
            assert time.monotonic() - t_kill < 10, "SIGTERM must stop the run within 10 s"
            assert code == 143, p.output
            if "Interrupted by SIGTERM" in p.output:
                assert "run the same command again to resume" in p.output
        else:
            assert code == 137, p.output
        progress.append(len(list(run_dir.glob("shard-*.json"))))
        # Never a final output without its marker, never a torn one (marker and output agree).
        marker = out.with_name(out.name + ".success.json")
        assert not marker.exists() or json.loads(marker.read_text())["output_bytes"] == out.stat().st_size

    code, log = cli_process.run(args, env)  # the same command once more finishes the job
    assert code == 0, log
    assert kills == KILLS_PER_MODE
    # The kills landed while rows were being committed (not all during start-up), and left work to do.
    assert sum(b > a for a, b in zip([0] + progress, progress)) >= 3, progress
    assert "rows already done" in log and not out.with_name(out.name + ".success.json").stat().st_size == 0
    assert read_rows(out) == read_rows(ref)  # same rows, same order, same values (sampled ones too)
    assert_finished_cleanly(out, SWEEP_ROWS, keep_checkpoints=True)
    # Every row was committed exactly once over all the killed runs (uncommitted shards were quarantined).
    ids = committed_row_ids(run_dir)
    assert sorted(ids) == list(range(SWEEP_ROWS))


SHARD_POINTS = [p for p in CRASH_POINTS if p.startswith(("shard", "dir", "manifest"))]
FINAL_POINTS = [p for p in CRASH_POINTS if p not in SHARD_POINTS]
CASES = [(p, n) for p in SHARD_POINTS for n in (1, 2, 4)] + [(p, 1) for p in FINAL_POINTS]
CP_ROWS, CP_EVERY = 120, 30  # 4 shards: n = 4 is the last commit


@pytest.fixture(scope="module")
def crash_job(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict:
    d = tmp_path_factory.mktemp("crash-points")
    env = {"BATCHLLM_CACHE_DIR": str(demo_model_dir.parent)}
    inp = write_rows_csv(d / "in.csv", CP_ROWS)
    tpl = write_template(d / "t.j2")
    extra = [*SEEDED, "--checkpoint-rows", str(CP_EVERY), "--checkpoint-seconds", "1000"]
    ref = d / "ref.parquet"
    run_ok(job_args(inp, tpl, ref, *extra), env)
    return {"dir": d, "env": env, "inp": inp, "tpl": tpl, "extra": extra, "ref": read_rows(ref)}


def test_crash_points_cover_every_commit_step() -> None:
    assert set(CRASH_POINTS) == {
        "shard_write", "shard_fsync", "shard_rename", "dir_fsync", "manifest_update",
        "final_write", "final_rename", "marker", "cleanup", "cleanup_manifest",
    }


@pytest.mark.parametrize("point,nth", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_crash_point_then_resume(crash_job: dict, point: str, nth: int) -> None:
    d: Path = crash_job["dir"]
    out = d / f"{point}-{nth}" / "out.parquet"
    run_dir = out.with_name(out.name + ".batchllm")
    args = job_args(crash_job["inp"], crash_job["tpl"], out, *crash_job["extra"])
    code, log = cli_process.run(args, {**crash_job["env"], "BATCHLLM_CRASH_AT": f"{point}:{nth}"})
    assert code == CRASH_EXIT_CODE, log

    # What the crash left behind, step by step.
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    if point in ("shard_write", "shard_fsync"):
        assert any(n.startswith(f".shard-{nth:06d}.parquet.") and n.endswith(".tmp") for n in names), names
        assert f"shard-{nth:06d}.json" not in names
    elif point in ("shard_rename", "dir_fsync"):
        assert f"shard-{nth:06d}.parquet" in names and f"shard-{nth:06d}.json" not in names, names
    elif point == "manifest_update":
        assert f"shard-{nth:06d}.json" in names
    elif point == "final_write":
        assert not out.exists()
        assert any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
    elif point == "final_rename":
        assert out.exists() and not out.with_name(out.name + ".success.json").exists()
    elif point == "marker":
        assert out.with_name(out.name + ".success.json").exists() and run_dir.exists()
    elif point == "cleanup":  # the manifest goes last: it still says whose directory this is
        assert names == ["manifest.json"], names
    elif point == "cleanup_manifest":
        assert run_dir.is_dir() and names == [], names
    finished = ("marker", "cleanup", "cleanup_manifest")
    assert not out.with_name(out.name + ".success.json").exists() or point in finished
    if point in ("cleanup", "cleanup_manifest"):
        # a finished job: its leftover directory is no checkpoint to show, and status says what it is
        result = invoke(["status", str(out), "--json"])
        st = json.loads(result.stdout)
        assert (result.exit_code, st["state"], st["run_dir"]) == (0, "finished", None), st
        assert "cleanup was cut short" in st["problems"][0], st

    code, log = cli_process.run(args, crash_job["env"])
    assert code == 0, log
    if point in ("shard_rename", "dir_fsync"):
        assert "moved to" in log and "quarantine" in log  # renamed but never committed: rows run again
    if point == "manifest_update":
        assert f"{nth * CP_EVERY} of {CP_ROWS} rows already done" in log
    if point in ("final_write", "final_rename"):
        assert f"{CP_ROWS} of {CP_ROWS} rows already done" in log
    if point in finished:
        assert "already finished" in log
    assert read_rows(out) == crash_job["ref"]
    assert_finished_cleanly(out, CP_ROWS)


@pytest.mark.parametrize("point", ["final_write", "final_rename", "marker"])
def test_sigterm_while_the_output_is_finalised(crash_job: dict, point: str) -> None:
    """SIGTERM while the finished job's output is written: before the output is renamed into place the
    run is interrupted (143, no output, the same command writes it); from the rename on the job has
    finished, so the run ends as finished (0, marker written) instead of saying "the output is not
    written yet" (143) while the output is there."""
    d: Path = crash_job["dir"]
    out = d / f"sigterm-{point}" / "out.parquet"
    args = job_args(crash_job["inp"], crash_job["tpl"], out, *crash_job["extra"])
    code, log = cli_process.run(args, {**crash_job["env"], "BATCHLLM_SIGNAL_AT": point})
    if point == "final_write":
        assert code == 128 + signal.SIGTERM, log
        assert "the output is not written yet" in " ".join(log.split()) and not out.exists()
        code, log = cli_process.run(args, crash_job["env"])
    assert code == 0, log
    assert read_rows(out) == crash_job["ref"]
    assert_finished_cleanly(out, CP_ROWS)


def _entry_point() -> list[str]:
    exe = Path(sys.executable).with_name("batchllm")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "batchllm_cli"]


@pytest.mark.slow
def test_entry_point_sigterm_and_kill_then_resume(tmp_path: Path, env: dict[str, str]) -> None:
    """The installed `batchllm` command itself: SIGTERM exits 143 within 10 s keeping finished rows,
    SIGKILL loses at most the uncommitted ones, and the same command finishes the job."""
    n = 600
    inp = write_rows_csv(tmp_path / "in.csv", n)
    tpl = write_template(tmp_path / "t.j2")
    extra = [*SEEDED, "--checkpoint-rows", "20", "--checkpoint-seconds", "0.2", "--keep-checkpoints"]
    ref = tmp_path / "ref.parquet"
    run_ok(job_args(inp, tpl, ref, *extra), env)
    out = tmp_path / "out.parquet"
    run_dir = out.with_name(out.name + ".batchllm")
    cmd = _entry_point() + job_args(inp, tpl, out, *extra)
    full_env = {**os.environ, **env}

    def start_and_wait_for_commits(min_shards: int) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 120
        while time.monotonic() < end and p.poll() is None:
            if len(list(run_dir.glob("shard-*.json"))) >= min_shards:
                break
            time.sleep(0.02)
        assert p.poll() is None, p.communicate()[1]
        return p

    p = start_and_wait_for_commits(1)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - t < 10
    assert p.returncode == 143, err
    assert "Interrupted by SIGTERM" in err and "run the same command again to resume" in err
    after_term = len(committed_row_ids(run_dir))
    assert 0 < after_term < n

    p = start_and_wait_for_commits(len(list(run_dir.glob("shard-*.json"))) + 2)
    p.kill()
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL

    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stderr
    assert read_rows(out) == read_rows(ref)
    assert sorted(committed_row_ids(run_dir)) == list(range(n))
    again = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already finished" in again.stderr


def test_sigint_commits_finished_rows_and_exits_130(tmp_path: Path, env: dict[str, str]) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", SIGNAL_ROWS)
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "out.parquet"
    run_dir = out.with_name(out.name + ".batchllm")
    # Large shards: the rows finished since the last commit are what SIGINT must save.
    args = job_args(inp, tpl, out, "--checkpoint-rows", "100000", "--checkpoint-seconds", "1000")
    p = cli_process.start(args, env, tmp_path / "run.log")
    _wait_for_generation(p)
    time.sleep(1.0)  # some rows finish (the whole job takes several seconds)
    assert p.running
    t = time.monotonic()
    p.kill(signal.SIGINT)
    assert p.wait(timeout=30) == 130, p.output
    assert time.monotonic() - t < 10
    assert "Interrupted by SIGINT" in p.output
    saved = committed_row_ids(run_dir)
    assert 0 < len(saved) < SIGNAL_ROWS  # no commit was due: these are the rows the signal flushed
    assert not out.with_name(out.name + ".lock").exists()  # an orderly exit releases its lock


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupted_message_counts_the_rows_committed_on_disk(
    tmp_path: Path, env: dict[str, str], sig: signal.Signals
) -> None:
    """The "N of M rows are committed" of an interrupted run is what is on disk once it exits: the rows
    the signal flushed included, the number `status` and the --summary file's job.rows report."""
    inp = write_rows_csv(tmp_path / "in.csv", SIGNAL_ROWS)
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    run_dir = out.with_name(out.name + ".batchllm")
    # No commit falls due: every committed row is one the signal flushed (the rows it used to leave out).
    args = job_args(inp, tpl, out, "--checkpoint-rows", "100000", "--checkpoint-seconds", "1000",
                    "--summary", str(summary))
    p = cli_process.start(args, env, tmp_path / "run.log")
    _wait_for_generation(p)
    time.sleep(1.0)  # some rows finish (the whole job takes several seconds)
    assert p.running
    p.kill(sig)
    assert p.wait(timeout=30) == 128 + sig, p.output
    said = re.search(r"Interrupted by \w+: (\d+) of (\d+) rows are committed", " ".join(p.output.split()))
    assert said, p.output
    on_disk = len(committed_row_ids(run_dir))
    assert 0 < on_disk < SIGNAL_ROWS
    assert (int(said.group(1)), int(said.group(2))) == (on_disk, SIGNAL_ROWS), p.output
    status = invoke(["status", str(out), "--json"])
    assert status.exit_code == 11, status.output
    assert json.loads(status.stdout)["rows_done"] == on_disk
    assert json.loads(summary.read_text())["job"]["rows"] == on_disk
