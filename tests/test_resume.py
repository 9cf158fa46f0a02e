"""Resume semantics of `batchllm run`: fingerprint refusals, --restart, finished jobs, torn shards, locks,
`batchllm status`, --id-column, GPU out-of-memory back-off. On the demo model; partial runs are made
with a crash point in a real process (cli_process), the rest runs in-process."""
from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

import cli_process
from reliability_utils import (
    SEEDED,
    assert_finished_cleanly,
    committed_row_ids,
    flat,
    invoke,
    job_args,
    read_rows,
    snapshot,
    write_rows_csv,
    write_template,
)

ROWS, EVERY = 120, 30


class Job:
    def __init__(self, root: Path, env: dict[str, str], *extra: str) -> None:
        self.root = root
        self.env = env
        self.inp = write_rows_csv(root / "in.csv", ROWS)
        self.tpl = write_template(root / "t.j2")
        self.out = root / "out" / "result.parquet"
        self.run_dir = self.out.with_name(self.out.name + ".batchllm")
        self.extra = [*SEEDED, "--checkpoint-rows", str(EVERY), "--checkpoint-seconds", "1000", *extra]

    def args(self, *more: str, out: Path | None = None) -> list[str]:
        return job_args(self.inp, self.tpl, out or self.out, *self.extra, *more)

    def crash_after_commits(self, n: int) -> None:
        """A run killed right after its n-th shard commit (n * EVERY rows committed)."""
        code, log = cli_process.run(self.args(), {**self.env, "BATCHLLM_CRASH_AT": f"manifest_update:{n}"})
        assert code == 137, log
        assert len(list(self.run_dir.glob("shard-*.json"))) == n

    def reference(self, *more: str) -> list[dict]:
        out = self.root / "ref" / f"ref{len(list(self.root.glob('ref/*.parquet')))}.parquet"
        result = invoke(self.args(*more, out=out))
        assert result.exit_code == 0, result.output
        return read_rows(out)


@pytest.fixture
def job(tmp_path: Path, env: dict[str, str]) -> Job:
    return Job(tmp_path, env)


# ---- changed fingerprint ---------------------------------------------------------------------------
def _copy_model(src: Path, dst: Path, change: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if change:
        config = json.loads((dst / "config.json").read_text())
        config.update(change)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


CHANGES = ["template", "model", "max_tokens", "temperature", "seed", "ignore_eos", "input_cell", "row_order"]


@pytest.mark.parametrize("change", CHANGES)
def test_changed_job_is_refused_and_checkpoint_untouched(
    job: Job, change: str, demo_model_dir: Path, no_model: None
) -> None:
    job.crash_after_commits(2)
    before_run_dir, before_out = snapshot(job.run_dir), sorted(p.name for p in job.out.parent.iterdir())
    args = job.args()
    expect = {
        "template": "template text",
        "model": "model path",
        "max_tokens": "--max-tokens (3 -> 4)",
        "temperature": "--temperature (0.8 -> 0.5)",
        "seed": "--seed (7 -> 8)",
        "ignore_eos": "--ignore-eos",
        "input_cell": "input content",
        "row_order": "input content",
    }[change]
    if change == "template":
        job.tpl.write_text("Say: {{ text }}!")  # one character
    elif change == "model":
        other = _copy_model(demo_model_dir, job.root / "model2", {"rms_norm_eps": 1e-6})
        args += ["--model", str(other)]
    elif change == "max_tokens":
        args += ["--max-tokens", "4"]  # the last one wins over FAST's
    elif change == "temperature":
        args += ["--temperature", "0.5"]
    elif change == "seed":
        args += ["--seed", "8"]
    elif change == "ignore_eos":
        args += ["--ignore-eos"]
    elif change == "input_cell":
        text = job.inp.read_text()
        job.inp.write_text(text.replace("r5 f", "r5 F", 1))
    elif change == "row_order":
        lines = job.inp.read_text().splitlines(keepends=True)
        lines[1], lines[2] = lines[2], lines[1]
        job.inp.write_text("".join(lines))
    result = invoke(args)
    assert result.exit_code == 4, result.output
    message = flat(result.stderr)
    assert "belongs to a different job" in message and expect in message and "--restart" in message
    if change == "model":
        assert "model files" in message  # the config changed too
    errors = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error: ")  # one line
    assert snapshot(job.run_dir) == before_run_dir  # byte for byte
    assert sorted(p.name for p in job.out.parent.iterdir()) == before_out


def test_restart_discards_the_old_checkpoint(job: Job) -> None:
    job.crash_after_commits(2)
    job.tpl.write_text("Repeat: {{ text }}")
    assert invoke(job.args()).exit_code == 4
    result = invoke(job.args("--restart"))
    assert result.exit_code == 0, result.output
    assert "discarding the checkpoint" in flat(result.stderr)
    assert "already done" not in result.stderr
    assert read_rows(job.out) == job.reference()
    assert_finished_cleanly(job.out, ROWS)


def test_finished_job_does_nothing_when_run_again(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke(job.args()).exit_code == 0
    stat = job.out.stat()
    marker = job.out.with_name(job.out.name + ".success.json")
    marker_bytes = marker.read_bytes()
    import engine.llm_engine

    init = engine.llm_engine.LLMEngine.__init__
    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    t = time.monotonic()
    result = invoke(job.args())
    assert result.exit_code == 0, result.output
    assert time.monotonic() - t < 10
    assert "already finished" in flat(result.stderr) and "nothing to do" in result.stderr
    assert job.out.stat().st_mtime_ns == stat.st_mtime_ns and marker.read_bytes() == marker_bytes
    assert not job.run_dir.exists()
    # A different job on the same output (finished, not partial) is a new job, not a refusal.
    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", init)
    job.tpl.write_text("Repeat: {{ text }}")
    result = invoke(job.args())
    assert result.exit_code == 0, result.output
    # ... said on stderr, naming what changed, since the old output is replaced
    assert "holds the finished output of a different job (changed: template text)" in flat(result.stderr)
    assert json.loads(marker.read_text())["fingerprint"]["template"] == "Repeat: {{ text }}"


# ---- torn shards -------------------------------------------------------------------------------------
TEARS = ["empty", "one_byte", "half", "minus_one", "garbage", "deleted"]


@pytest.mark.parametrize("tear", TEARS)
def test_torn_shard_is_quarantined_and_recomputed(job: Job, tear: str) -> None:
    job.crash_after_commits(3)
    shard = job.run_dir / "shard-000003.parquet"
    data = shard.read_bytes()
    if tear == "deleted":
        shard.unlink()
    elif tear == "garbage":
        shard.write_bytes(data + b"\x00garbage\xff" * 10)
    else:
        size = {"empty": 0, "one_byte": 1, "half": len(data) // 2, "minus_one": len(data) - 1}[tear]
        shard.write_bytes(data[:size])
    result = invoke(job.args("--keep-checkpoints"))
    assert result.exit_code == 0, result.output
    message = flat(result.stderr)
    assert "torn or uncommitted" in message and "quarantine" in message
    assert f"{2 * EVERY} of {ROWS} rows already done" in message  # only the torn shard's rows ran again
    quarantined = [p.name for p in (job.run_dir / "quarantine").iterdir()]
    assert any(n.startswith("shard-000003.json") for n in quarantined)
    assert tear == "deleted" or any(n.startswith("shard-000003.parquet") for n in quarantined)
    assert sorted(committed_row_ids(job.run_dir)) == list(range(ROWS))
    assert read_rows(job.out) == job.reference()
    assert_finished_cleanly(job.out, ROWS, keep_checkpoints=True)


# ---- locks and status --------------------------------------------------------------------------------
def test_second_run_is_refused_while_the_first_works_and_a_dead_ones_lock_is_taken_over(
    tmp_path: Path, env: dict[str, str]
) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 4000)
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "out.parquet"
    args = job_args(inp, tpl, out, "--checkpoint-rows", "50", "--checkpoint-seconds", "0.2")
    first = cli_process.start(args, env, tmp_path / "first.log")
    run_dir = out.with_name(out.name + ".batchllm")
    end = time.monotonic() + 120
    while time.monotonic() < end and first.running and not list(run_dir.glob("shard-*.json")):
        time.sleep(0.02)
    assert first.running, first.output

    status = invoke(["status", str(out), "--json"])
    assert status.exit_code == 10, status.output  # running
    st = json.loads(status.stdout)
    assert st["state"] == "running" and st["pid"] == first.pid and st["rows_total"] == 4000

    t = time.monotonic()
    second = invoke(args)
    assert time.monotonic() - t < 5
    assert second.exit_code == 75, second.output
    assert f"Another batchllm run (pid {first.pid}" in flat(second.stderr)

    first.kill()  # kill -9: its lock file stays behind, but the kernel dropped its flock
    assert first.wait() == 137
    assert out.with_name(out.name + ".lock").exists()
    third = invoke(args)
    assert third.exit_code == 0, third.output
    assert len(read_rows(out)) == 4000
    assert_finished_cleanly(out, 4000)


def test_status_of_an_interrupted_and_a_finished_run(job: Job) -> None:
    job.crash_after_commits(2)
    text = invoke(["status", str(job.out)])
    assert text.exit_code == 11, text.output  # interrupted
    assert "state: interrupted" in text.stdout and f"rows: {2 * EVERY}/{ROWS} done" in text.stdout
    assert "run the same `batchllm run` command again" in text.stdout
    for target in (job.out, job.run_dir):
        st = json.loads(invoke(["status", str(target), "--json"]).stdout)
        assert (st["state"], st["rows_done"], st["rows_total"], st["shards"]) == ("interrupted", 60, ROWS, 2)
        assert st["last_commit_at"] is not None
    assert invoke(job.args()).exit_code == 0
    st = json.loads(invoke(["status", str(job.out), "--json"]).stdout)
    assert (st["state"], st["rows_done"], st["rows_failed"], st["percent"]) == ("finished", ROWS, 0, 100.0)
    st = json.loads(invoke(["status", str(job.root / "nothing.parquet"), "--json"]).stdout)
    assert st["state"] == "not started"


def _status(target: Path) -> tuple[int, dict]:
    result = invoke(["status", str(target), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_status_of_the_output_finds_a_checkpoint_dir_of_an_interrupted_run(tmp_path: Path, env: dict[str, str]) -> None:
    """With --checkpoint-dir, `status OUT` (what a cron or Airflow sensor calls) reads the same
    checkpoint as `status DIR`: interrupted, not "not started"."""
    job = Job(tmp_path, env, "--checkpoint-dir", str(tmp_path / "ckpt"))
    job.run_dir = tmp_path / "ckpt"
    job.crash_after_commits(2)
    for target in (job.run_dir, job.out):
        code, st = _status(target)
        assert code == 11, st  # interrupted
        assert (st["state"], st["rows_done"], st["rows_total"], st["shards"]) == ("interrupted", 60, ROWS, 2)
        assert st["run_dir"] == str(job.run_dir) and not st["problems"], st
    text = invoke(["status", str(job.out)]).stdout
    assert f"checkpoint: {job.run_dir} (2 shards)" in text and f"rows: {2 * EVERY}/{ROWS} done" in text
    assert invoke(job.args()).exit_code == 0
    assert_finished_cleanly(job.out, ROWS)
    assert not job.run_dir.exists() and not job.out.with_name(job.out.name + ".checkpoint.json").exists()
    code, st = _status(job.out)
    assert (code, st["state"], st["rows_done"], st["problems"]) == (0, "finished", ROWS, [])


def test_status_of_the_output_finds_a_checkpoint_dir_while_running_and_after_sigterm(
    tmp_path: Path, env: dict[str, str]
) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 4000)
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "out" / "o.parquet"
    run_dir = tmp_path / "ckpt"
    args = job_args(inp, tpl, out, "--checkpoint-dir", str(run_dir), "--checkpoint-rows", "50",
                    "--checkpoint-seconds", "0.2")
    p = cli_process.start(args, env, tmp_path / "run.log")
    end = time.monotonic() + 120
    while time.monotonic() < end and p.running and len(list(run_dir.glob("shard-*.json"))) < 2:
        time.sleep(0.02)
    assert p.running, p.output
    code, st = _status(out)
    assert code == 10, st  # running
    assert (st["state"], st["pid"], st["rows_total"], st["run_dir"]) == ("running", p.pid, 4000, str(run_dir))
    assert st["rows_done"] >= 50 and st["shards"] >= 2
    p.kill(signal.SIGTERM)
    assert p.wait(timeout=30) == 143, p.output
    committed = len(committed_row_ids(run_dir))
    for target in (run_dir, out):
        code, st = _status(target)
        assert (code, st["state"], st["rows_done"], st["rows_total"]) == (11, "interrupted", committed, 4000), st


def test_status_of_the_output_ignores_a_checkpoint_pointer_that_names_another_job(tmp_path: Path) -> None:
    from batchllm_cli.status import read_status

    out, pointer = tmp_path / "o.parquet", tmp_path / "o.parquet.checkpoint.json"
    other = tmp_path / "ckpt"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"fingerprint": {}, "total_rows": 9, "output": str(tmp_path / "x.csv")}))
    pointer.write_text(json.dumps({"run_dir": str(other)}))
    st = read_status(out)  # the directory was reused for another output (--restart): not this job's
    assert (st.state, st.run_dir, st.rows_total) == ("not started", None, None)
    assert len(st.problems) == 1 and "holds the checkpoint of" in st.problems[0] and str(pointer) in st.problems[0]
    pointer.write_text("{not json")
    st = read_status(out)
    assert st.state == "not started" and len(st.problems) == 1 and "cannot be read" in st.problems[0]
    pointer.write_text(json.dumps({"run_dir": str(tmp_path / "gone")}))  # deleted by hand: no checkpoint
    assert (read_status(out).state, read_status(out).problems) == ("not started", ())


def test_checkpoint_pointer_never_overwrites_an_input(tmp_path: Path, env: dict[str, str], no_model: None) -> None:
    inp = write_rows_csv(tmp_path / "o.parquet.checkpoint.json", 3)
    tpl = write_template(tmp_path / "t.j2")
    result = invoke(job_args(inp, tpl, tmp_path / "o.parquet", "--input-format", "csv",
                             "--checkpoint-dir", str(tmp_path / "ckpt")))
    assert result.exit_code == 2, result.output
    assert "the checkpoint pointer" in flat(result.stderr) and "the input file" in flat(result.stderr)
    assert not (tmp_path / "ckpt").exists()


def test_status_eta_from_commit_times(tmp_path: Path) -> None:
    from batchllm_cli.file_lock import FileLock
    from batchllm_cli.status import read_status

    run_dir = tmp_path / "o.parquet.batchllm"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"fingerprint": {}, "total_rows": 1000, "output": str(tmp_path / "o.parquet")}))
    now = time.time()
    # an earlier attempt committed 2 x 100 rows an hour ago; this one 100 rows every 10 s since now - 45 s
    times = [now - 3600, now - 3590] + [now - 40 + 10 * i for i in range(1, 5)]
    for i, at in enumerate(times, start=1):
        (run_dir / f"shard-{i:06d}.parquet").write_bytes(b"x")
        (run_dir / f"shard-{i:06d}.json").write_text(json.dumps(
            {"shard": f"shard-{i:06d}.parquet", "rows": 100, "errors": 1, "bytes": 1, "sha256": "0" * 64,
             "committed_at": at}))
    lock = FileLock(tmp_path / "o.parquet.lock")
    lock.acquire("o.parquet")  # liveness is the flock itself
    try:
        lock.record_owner()
        (tmp_path / "o.parquet.lock").write_text(json.dumps({"pid": 1, "host": "h", "since": now - 45}))
        st = read_status(tmp_path / "o.parquet")
    finally:
        lock.release()
    # the hour between the attempts is not work: the rate is this attempt's
    assert (st.state, st.rows_done, st.rows_failed, st.rows_per_s) == ("running", 600, 6, 10.0)
    assert st.eta_s == pytest.approx(40.0)
    from batchllm_cli.status import format_status

    # times in UTC, named as such (they were the machine's local time, with no zone)
    [line] = [ln for ln in format_status(st).splitlines() if ln.startswith("last commit: ")]
    assert re.match(r"last commit: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \(", line), line


# ---- row identity --------------------------------------------------------------------------------
def test_id_column_duplicates_nulls_and_unknown_are_refused(tmp_path: Path, env: dict, no_model: None) -> None:
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "o.parquet"
    dup = tmp_path / "dup.csv"
    dup.write_text("id,text\n1,a\n2,b\n1,c\n3,d\n2,e\n")
    result = invoke(job_args(dup, tpl, out, "--id-column", "id"))
    assert result.exit_code == 2
    assert "--id-column 'id' has 2 duplicate value(s) (e.g. '1', '2')" in flat(result.stderr)  # CSV ids are text
    nul = tmp_path / "nul.csv"
    nul.write_text("id,text\n1,a\n,b\n3,c\n")
    result = invoke(job_args(nul, tpl, out, "--id-column", "id"))
    assert result.exit_code == 2 and "is null in 1 row(s)" in flat(result.stderr)
    result = invoke(job_args(nul, tpl, out, "--id-column", "key"))
    assert result.exit_code == 2 and "not a column" in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".batchllm").exists()


def test_id_column_keys_sampling_and_resumes_identically(tmp_path: Path, env: dict[str, str]) -> None:
    job = Job(tmp_path, env, "--id-column", "id")
    # ids that are not positions: the sample of a row follows its id, not its place in the file
    lines = job.inp.read_text().splitlines()
    job.inp.write_text("\n".join([lines[0]] + [f"k{line}" for line in lines[1:]]) + "\n")
    ref = job.reference()
    job.crash_after_commits(2)
    result = invoke(job.args())
    assert result.exit_code == 0, result.output
    assert "60 of 120 rows already done" in flat(result.stderr)
    assert read_rows(job.out) == ref
    (tmp_path / "ordinal").mkdir()
    ordinal = Job(tmp_path / "ordinal", env)
    ordinal.inp.write_text(job.inp.read_text())
    assert [r["response"] for r in ordinal.reference()] != [r["response"] for r in ref]


# ---- GPU out of memory ---------------------------------------------------------------------------
def _oom_after(monkeypatch: pytest.MonkeyPatch, after: int, times: int) -> list[int]:
    """The engine's generation loop (every sharing mode) raises CUDA OOM after `after` results, in its
    first `times` calls."""
    import torch

    import engine.llm_engine

    original = engine.llm_engine.LLMEngine._run_waves
    calls: list[int] = []

    def run_waves(self, waves, planned):  # noqa: ANN001, ANN202
        calls.append(1)
        for i, result in enumerate(original(self, waves, planned)):
            if i == after and len(calls) <= times:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield result

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "_run_waves", run_waves)
    return calls


def test_gpu_out_of_memory_backs_off_then_succeeds(job: Job) -> None:
    with pytest.MonkeyPatch.context() as mp:
        calls = _oom_after(mp, after=40, times=1)
        result = invoke(job.args())
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 and "Out of GPU memory; retrying the remaining rows" in flat(result.stderr)
    assert read_rows(job.out) == job.reference()


def test_gpu_out_of_memory_that_persists_exits_75_keeping_finished_rows(job: Job) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _oom_after(mp, after=10, times=99)
        result = invoke(job.args())
    assert result.exit_code == 75, result.output
    message = flat(result.stderr)
    assert "Out of GPU memory" in message and "after backing off" in message and "--max-batch-tokens" in message
    assert len(committed_row_ids(job.run_dir)) >= 30  # rows finished before each failure were committed
    result = invoke(job.args())
    assert result.exit_code == 0, result.output
    assert "rows already done" in result.stderr
    assert read_rows(job.out) == job.reference()


def test_out_of_memory_is_recognized_without_torch() -> None:
    from batchllm_cli.job import is_out_of_memory

    class OutOfMemoryError(RuntimeError):
        pass

    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_exit_codes_in_help() -> None:
    text = flat(invoke(["run", "--help"]).output)
    for phrase in ("0 all rows done", "3 finished", "4 the checkpoint holds a different job", "75 temporary failure",
                   "130/143 interrupted"):
        assert phrase in text
    assert "--checkpoint-dir" in text and "--restart" in text and "--keep-checkpoints" in text

