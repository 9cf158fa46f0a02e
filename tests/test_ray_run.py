"""`run --workers N` on a local Ray (2 CPU workers, demo model): the same output as one process, greedy
and seeded; every prefix group on one worker; a worker SIGKILLed mid-job and a driver killed with -9
both end in the same output. One Ray for the whole module (starting one costs seconds); the CLI runs
in this process (it finds Ray initialized) or, to be killed, in a forked one given --ray-address."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import cli_process
from batchllm_cli.table_io import ROW_ID
from test_run_contract import checked_summary
from reliability_utils import SEEDED, flat, invoke, job_args, one_error_line, read_rows, write_template

DOCS, QUESTIONS = 6, 4
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _doc_qa(path: Path, docs: int = DOCS, questions: int = QUESTIONS) -> Path:
    """Questions on documents, rows shuffled: a document's questions are one prefix group."""
    rows = [(d, f"document {d}: " + " ".join(f"w{d}x{j}" for j in range(24)), f"question {q}?")
            for d in range(docs) for q in range(questions)]
    rows = [rows[(i * 7) % len(rows)] for i in range(len(rows))]  # a permutation: 7 is prime to 24 and 48
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["doc_id", "doc", "q"])
        w.writerows(rows)
    return path


@pytest.fixture
def job(tmp_path: Path, env: dict) -> tuple[Path, Path]:
    return _doc_qa(tmp_path / "docs.csv"), write_template(tmp_path / "t.j2", "Read: {{ doc }}\nAnswer: {{ q }}")


def test_without_ray_the_flags_fail_with_one_line_naming_the_extra(
    job: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    inp, tpl = job
    for flag in (["--workers", "2"], ["--ray-address", "auto"]):
        out = tmp_path / "out" / "r.parquet"
        result = invoke(job_args(inp, tpl, out, *flag))
        assert result.exit_code == 2, result.output
        assert "pip install 'batchllm[ray]'" in one_error_line(result.stderr)
        assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_worker_sees_the_run_directory_only_through_this_run_s_manifest(tmp_path: Path) -> None:
    # what each replica checks before any model loads: the manifest the driver wrote, with its run id
    from batchllm_cli.checkpoint import RunDir
    from batchllm_cli.collector import OutputColumns
    from batchllm_cli.ray_worker import ReplicaWorker, WorkerSetup

    run_dir = RunDir(tmp_path / "run")
    run_dir.ensure()

    def check(run_id: str) -> str | None:
        setup = WorkerSetup(worker=0, run_dir=str(run_dir.path), run_id=run_id, model_dir="", engine_config=None,
                            params=None, columns=OutputColumns(), constraint=None, total_rows=1, checkpoint_rows=1,
                            checkpoint_seconds=1.0, plan_chunk_tokens=1, planned=True)
        return ReplicaWorker(setup).check()[2]

    assert "cannot read" in check("r1")  # not there (another filesystem): the run says which worker
    run_dir.create({"x": 1}, {}, dir_created=True)
    run_id = run_dir.read_manifest()["run_id"]
    assert check(run_id) is None
    assert "another run" in check("an older run's id")


@pytest.fixture(scope="module")
def ray_address() -> str:
    # Ray >= 2.59 authenticates a local cluster with a token, its mode read once when ray is imported.
    # The forked CLI runs that join this cluster come from a forkserver started earlier, with an earlier
    # environment: this cluster and they share an explicit mode and token, set before ray is imported.
    old = {k: os.environ.get(k) for k in RAY_AUTH}
    os.environ.update(RAY_AUTH)
    ray = pytest.importorskip("ray")  # in the test extra: CI has it
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(inp: Path, tpl: Path, out: Path, *extra: str) -> dict:
    summary = out.with_suffix(".summary.json")
    result = invoke(job_args(inp, tpl, out, "--summary", str(summary), *extra))
    assert result.exit_code == 0, result.output
    return checked_summary(summary.read_text())  # the keys and invariants of every run's summary


def _worker_of_rows(run_dir: Path) -> dict[int, int]:
    """row id -> the worker whose shard committed it (from the kept checkpoint's shard names)."""
    owner = {}
    for shard in run_dir.glob("shard-*-w*.parquet"):
        worker = int(re.search(r"-w(\d+)\.", shard.name).group(1))
        for row in pq.read_table(shard, columns=[ROW_ID]).column(0).to_pylist():
            owner[row] = worker
    return owner


@pytest.mark.parametrize("sampling", [[], SEEDED], ids=["greedy", "seeded"])
def test_two_workers_write_the_output_of_one_process_with_each_document_on_one_worker(
    ray_address: str, job: tuple[Path, Path], tmp_path: Path, sampling: list[str]
) -> None:
    inp, tpl = job
    _run(inp, tpl, tmp_path / "one.parquet", *sampling)
    two = tmp_path / "two.parquet"
    summary = _run(inp, tpl, two, "--workers", "2", "--keep-checkpoints", *sampling)
    assert read_rows(two) == read_rows(tmp_path / "one.parquet")
    assert summary["workers"] == 2 and summary["attempt"]["rows"] == DOCS * QUESTIONS
    scale = summary["scale_out"]
    assert scale["partition"]["top_groups"] == DOCS and scale["partition"]["split_groups"] == 0
    assert [w["rows"] for w in scale["per_worker"]] == [DOCS * QUESTIONS // 2] * 2  # equal documents: even halves
    owner = _worker_of_rows(two.with_name(two.name + ".batchllm"))
    docs = [r["doc_id"] for r in read_rows(inp)]
    assert sorted(owner) == list(range(len(docs)))
    for d in range(DOCS):
        assert len({owner[i] for i, doc in enumerate(docs) if int(doc) == d}) == 1  # a document's rows on one worker


@pytest.mark.parametrize("flags,says", [
    (["--kv-cache-memory", "4096TiB"], "Cannot allocate a KV cache of "),  # found only as a replica's engine starts
    (["--kv-cache-memory", "1", "--ray-address", "{address}"],  # a cluster's engines are checked there
     "--kv-cache-memory 1 byte holds no KV cache block of 16 tokens"),
], ids=["kv-larger-than-memory", "kv-without-a-block-on-a-cluster"])
def test_a_refused_engine_start_on_the_workers_leaves_no_run_directory(
    ray_address: str, job: tuple[Path, Path], tmp_path: Path, flags: list[str], says: str,
) -> None:
    """As in one process (test_engine_start.py): the same command would be refused again, so there is
    nothing to resume; a run directory left behind read as interrupted in status."""
    inp, tpl = job
    out = tmp_path / "new" / "out.parquet"
    result = invoke(job_args(inp, tpl, out, "--workers", "2", *(f.format(address=ray_address) for f in flags)))
    assert result.exit_code == 2, result.output
    assert says in one_error_line(result.stderr), result.output
    assert not (tmp_path / "new").exists()  # neither the run directory nor the output's directory
    status = invoke(["status", str(out), "--json"])
    assert (status.exit_code, json.loads(status.stdout)["state"]) == (12, "not started")


def _wait_for(predicate, what: str, proc: cli_process.CliProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.running, f"the run ended before {what}: {proc.output}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {proc.output}"
        time.sleep(0.02)


# A longer job (each worker's part takes seconds): rows go through a small KV cache a few at a time and
# commit a shard every two rows, so a kill lands between its first shard and its last.
SLOW = ["--max-tokens", "12", "--kv-cache-tokens", "384", "--checkpoint-rows", "2"]


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> tuple[Path, Path, Path, dict]:
    """(input, template, one process's output, env) of a job whose parts take each worker seconds."""
    d = tmp_path_factory.mktemp("slow")
    env = {"BATCHLLM_CACHE_DIR": str(demo_model_dir.parent), **RAY_AUTH}
    inp = _doc_qa(d / "docs.csv", docs=8, questions=6)
    tpl = write_template(d / "t.j2", "Read: {{ doc }}\nAnswer: {{ q }}")
    code, log = cli_process.run(job_args(inp, tpl, d / "one.parquet", *SLOW), env, d / "one.log")
    assert code == 0, log
    return inp, tpl, d / "one.parquet", env


def test_a_worker_killed_mid_job_is_replaced_and_the_output_is_the_same(
    ray_address: str, slow_job: tuple[Path, Path, Path, dict], tmp_path: Path
) -> None:
    inp, tpl, one, env = slow_job
    out = tmp_path / "two.parquet"
    summary = tmp_path / "two.json"
    proc = cli_process.start(job_args(inp, tpl, out, *SLOW, "--workers", "2", "--ray-address", ray_address,
                                      "--summary", str(summary)), env, tmp_path / "run.log")
    run_dir = out.with_name(out.name + ".batchllm")
    pid = lambda: re.search(r"worker 1: pid (\d+)", proc.output)  # noqa: E731
    _wait_for(lambda: pid() is not None and any(run_dir.glob("shard-*-w001.json")), "worker 1's first shard", proc)
    os.kill(int(pid().group(1)), signal.SIGKILL)
    assert proc.wait(120) == 0, proc.output
    assert read_rows(out) == read_rows(one)
    scale = checked_summary(summary.read_text())["scale_out"]
    assert scale["worker_failures"] == 1 and scale["rounds"] == 2, scale


def _started_after_a_worker_shard(ray_address: str, slow_job: tuple[Path, Path, Path, dict], out: Path,
                                  *extra: str) -> tuple[list[str], "cli_process.CliProcess"]:
    """(the args, the running process) of the slow job on two workers, once a worker committed a shard."""
    inp, tpl, _, env = slow_job
    args = job_args(inp, tpl, out, *SLOW, "--workers", "2", "--ray-address", ray_address)
    proc = cli_process.start([*args, *extra], env, out.parent / "run.log")
    run_dir = out.with_name(out.name + ".batchllm")
    _wait_for(lambda: any(run_dir.glob("shard-*-w*.json")), "a worker's first shard", proc)
    return args, proc


def test_the_driver_killed_with_9_resumes_with_the_same_command(
    ray_address: str, slow_job: tuple[Path, Path, Path, dict], tmp_path: Path
) -> None:
    inp, tpl, one, env = slow_job
    out = tmp_path / "two.parquet"
    args, proc = _started_after_a_worker_shard(ray_address, slow_job, out)
    proc.kill(signal.SIGKILL)
    assert proc.wait(30) == 128 + signal.SIGKILL
    assert not out.exists()
    code, log = cli_process.run([*args, "--summary", str(tmp_path / "resume.json")], env, tmp_path / "resume.log")
    assert code == 0, log
    summary = checked_summary((tmp_path / "resume.json").read_text())
    assert 0 < summary["job"]["rows_resumed"] < 48 and summary["attempt"]["rows"] == 48 - summary["job"]["rows_resumed"]
    assert read_rows(out) == read_rows(one)
    assert flat(log).count("worker 1: pid") == 1


def test_an_unreachable_ray_address_fails_at_once_with_one_line(tmp_path: Path, env: dict) -> None:
    """Ray retries an unreachable cluster for minutes (found by hand: a typo in the address hung a run
    for over 5 minutes, logging warnings); the run checks the address first and exits 2. In a new
    process: this one may already be connected to the module's Ray, and then no address is dialled."""
    pytest.importorskip("ray")
    import socket as socket_module

    with socket_module.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inp = _doc_qa(tmp_path / "docs.csv")
    tpl = write_template(tmp_path / "t.j2", "Read: {{ doc }}\nAnswer: {{ q }}")
    started = time.monotonic()
    code, log = cli_process.run(job_args(inp, tpl, tmp_path / "out" / "r.parquet", "--workers", "2",
                                         "--ray-address", f"127.0.0.1:{port}"), env, tmp_path / "run.log",
                                timeout=120)
    assert code == 2, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--ray-address 127.0.0.1:{port}" in errors[0] and "host:port" in errors[0], log
    assert time.monotonic() - started < 60
    # refused before anything is written: a run directory left behind read as "interrupted" in status
    assert not (tmp_path / "out").exists()
    code, log = cli_process.run(job_args(inp, tpl, tmp_path / "out" / "r.parquet", "--ray-address", "garbage"),
                                env, tmp_path / "run2.log", timeout=120)
    assert code == 2 and "--ray-address garbage is not a Ray address" in log, log
    assert not (tmp_path / "out").exists()


def test_the_driver_stopped_by_sigterm_says_how_many_rows_the_workers_committed(
    ray_address: str, slow_job: tuple[Path, Path, Path, dict], tmp_path: Path
) -> None:
    inp, tpl, one, env = slow_job
    out = tmp_path / "two.parquet"
    args, proc = _started_after_a_worker_shard(ray_address, slow_job, out, "--summary", str(tmp_path / "stopped.json"))
    proc.kill(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, proc.output
    said = re.search(r"Interrupted by SIGTERM: (\d+) of 48 rows are committed in", flat(proc.output))
    assert said is not None, proc.output
    # the summary's job counts what is committed (it said 0 rows: the driver's view of the last round)
    # (read just after the message: a replica may commit one more shard in between)
    assert json.loads((tmp_path / "stopped.json").read_text())["job"]["rows"] >= int(said.group(1)) > 0
    code, log = cli_process.run([*args, "--summary", str(tmp_path / "resume.json")], env, tmp_path / "resume.log")
    assert code == 0, log
    resumed = checked_summary((tmp_path / "resume.json").read_text())["job"]["rows_resumed"]
    assert 0 < int(said.group(1)) <= resumed  # workers may commit a last shard while they stop
    assert read_rows(out) == read_rows(one)


def test_what_rays_driver_prints_goes_to_stderr_not_to_the_summary(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # A replica killed mid-run made Ray's driver print "(raylet) A worker died ..." to stdout, before the
    # `--summary -` line that scripts parse (found by hand; seen again with the fix: it lands on stderr).
    import batchllm_cli.ray_run as ray_run

    monkeypatch.setattr(ray_run, "_execute_ray_run", lambda *args: print("(raylet) A worker died") or "report")
    assert ray_run.execute_ray_run(None) == "report"  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert out == "" and "(raylet) A worker died" in err


def test_a_stop_during_the_first_plan_keeps_its_time_as_plan_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the driver tokenized and sorted the rows: the summary said plan_s 0 (the plan's
    statistics were only kept once it was done)."""
    from types import SimpleNamespace

    import numpy as np

    import batchllm_cli.ray_run as ray_run

    def interrupted_plan(*args: object) -> None:
        time.sleep(0.2)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_run, "_plan", interrupted_plan)
    prepared = SimpleNamespace(run_dir=object(), committed=SimpleNamespace(done=np.zeros(3, dtype=bool), rows=0))
    pool = SimpleNamespace(alive=[0], ray=SimpleNamespace(put=None))
    tracker = SimpleNamespace(partition=None, plan_stats=[])
    with pytest.raises(KeyboardInterrupt):
        ray_run._run_rounds(prepared, pool, None, tracker, Path("."), None)  # type: ignore[arg-type]
    assert len(tracker.plan_stats) == 1 and tracker.plan_stats[0].plan_s >= 0.2, tracker.plan_stats
