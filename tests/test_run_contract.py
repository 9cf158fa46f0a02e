"""The cron/Airflow contract of `batchllm run` and `batchllm status`: the summary is one line of JSON
with the state, the exit code, ISO times and this attempt's counts kept apart from the whole job's (also
on a re-run of a finished job, and for an interrupted run); `status` exits with a code per state; the
first shard is committed early; progress is measured in token work. Demo model, real files."""
from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import cli_process
from reliability_utils import (
    SEEDED,
    committed_row_ids,
    flat,
    invoke,
    job_args,
    read_rows,
    write_rows_csv,
    write_template,
)

TOP_KEYS = {
    "state", "exit_code", "started_at", "finished_at", "input", "output", "template", "model_dir", "demo_model",
    "chat", "prefix_sharing", "attempt", "job", "model", "engine", "first_errors", "already_done", "run_dir",
    "errors_file", "rejects_file", "marker", "error", "workers", "scale_out",
}
ATTEMPT_KEYS = {
    "rows", "rows_ok", "rows_failed", "rows_truncated", "prompt_tokens", "prefix_hit_tokens", "prefill_tokens",
    "shared_prefix_tokens", "recomputed_tokens", "unique_prompt_tokens", "completion_tokens", "preemptions",
    "sharing_fallbacks", "peak_kv_blocks", "elapsed_s", "load_s", "write_s", "rows_per_s", "prompt_tokens_per_s",
    "output_tokens_per_s", "plan_chunks", "plan_boundary_tokens", "plan_out_of_core", "plan_s", "engine_wait_s",
}
JOB_KEYS = {
    "rows_total", "rows", "rows_ok", "rows_failed", "rows_rejected", "rows_resumed", "prompt_tokens",
    "completion_tokens", "finished_at",
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _utc(text: str) -> datetime:
    assert ISO_UTC.match(text), text
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    return moment


def checked_summary(text: str) -> dict:
    """The summary line with every documented key, and its counts consistent with each other."""
    assert "\n" not in text.rstrip("\n"), "the summary is one line"
    summary = json.loads(text)
    assert set(summary) == TOP_KEYS
    assert set(summary["attempt"]) == ATTEMPT_KEYS and set(summary["job"]) == JOB_KEYS
    assert _utc(summary["started_at"]) <= _utc(summary["finished_at"])
    att, job = summary["attempt"], summary["job"]
    assert att["rows"] == att["rows_ok"] + att["rows_failed"] and job["rows"] == job["rows_ok"] + job["rows_failed"]
    assert att["prefill_tokens"] == (att["prompt_tokens"] - att["prefix_hit_tokens"] + att["shared_prefix_tokens"]
                                     + att["recomputed_tokens"])
    assert att["recomputed_tokens"] >= 0
    if att["elapsed_s"] > 0:
        assert att["rows_per_s"] == pytest.approx(att["rows"] / att["elapsed_s"], rel=0.01)
        assert att["output_tokens_per_s"] == pytest.approx(att["completion_tokens"] / att["elapsed_s"], rel=0.01)
    return summary


def _status(target: Path) -> tuple[int, dict]:
    result = invoke(["status", str(target), "--json"])
    st = json.loads(result.stdout)
    assert st["exit_code"] == result.exit_code
    return result.exit_code, st


# ---- summary ---------------------------------------------------------------------------------------
def test_last_stdout_line_of_run_is_the_summary_and_status_exits_0(tmp_path: Path, env: dict) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 12)
    out = tmp_path / "out.parquet"
    result = invoke(job_args(inp, write_template(tmp_path / "t.j2"), out, "--summary", "-"))
    assert result.exit_code == 0, result.output
    # what an Airflow BashOperator pushes to XCom: the last line of stdout
    summary = checked_summary(result.stdout.splitlines()[-1])
    assert result.stdout.count("\n") == 1
    assert (summary["state"], summary["exit_code"], summary["already_done"], summary["error"]) == (
        "finished", 0, False, None)
    job, att = summary["job"], summary["attempt"]
    assert (job["rows_total"], job["rows"], job["rows_ok"], job["rows_resumed"], att["rows"]) == (12, 12, 12, 0, 12)
    prompt = sum(pq.read_table(out).column("response_prompt_tokens").to_pylist())
    assert att["prompt_tokens"] == job["prompt_tokens"] == prompt
    assert summary["chat"] is False and summary["model"]["architecture"] == "LlamaForCausalLM"
    code, st = _status(out)
    assert (code, st["state"]) == (0, "finished")


def test_summary_to_a_fifo_or_through_a_link_is_written_in_place(tmp_path: Path, env: dict) -> None:
    # A report used to be renamed over its path: a FIFO (or, as root, /dev/null or /dev/stdout) became a
    # regular file and its reader got nothing; a link to a file became a file of its own.
    import os
    import stat
    import threading

    inp, tpl = write_rows_csv(tmp_path / "in.csv", 3), write_template(tmp_path / "t.j2")
    fifo = tmp_path / "summary.fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    result = invoke(job_args(inp, tpl, tmp_path / "a.parquet", "--summary", str(fifo)))
    assert result.exit_code == 0, result.output
    reader.join(30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert checked_summary(got[0])["state"] == "finished"

    target = tmp_path / "runs" / "latest.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "summary.json"
    link.symlink_to(target)
    result = invoke(job_args(inp, tpl, tmp_path / "b.parquet", "--summary", str(link)))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and checked_summary(target.read_text())["state"] == "finished"
    analyzed = invoke(["analyze", str(inp), "-t", str(tpl), "--json", str(link)])
    assert analyzed.exit_code == 0, analyzed.output
    assert link.is_symlink() and json.loads(target.read_text())["rows"] == 3


def test_rows_in_error_finish_with_errors_and_status_exits_3(tmp_path: Path, env: dict) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"t{i}", "n": i % 3}) + "\n" for i in range(9)))
    tpl = write_template(tmp_path / "t.j2", "{{ text }} {{ 10 // n }}")  # n == 0 fails to render
    out = tmp_path / "out.parquet"
    summary_file = tmp_path / "summary.json"
    result = invoke(job_args(inp, tpl, out, "--summary", str(summary_file)))
    assert result.exit_code == 3, result.output
    summary = checked_summary(summary_file.read_text())
    assert (summary["state"], summary["exit_code"]) == ("finished_with_errors", 3)
    assert (summary["job"]["rows_failed"], summary["attempt"]["rows_failed"]) == (3, 3)
    code, st = _status(out)
    assert (code, st["state"], st["rows_failed"]) == (3, "finished", 3)
    # plain progress lines (stderr is not a terminal here): an ISO time, rates and the errors so far
    line = [ln for ln in result.stderr.splitlines() if " run: 9/9 rows" in ln][-1]
    assert ISO_UTC.match(line.split(" ")[0]), line
    assert "3 errors" in line and "prompt tok/s" in line and "output tok/s" in line and line.endswith("ETA 0:00:00")


def test_a_run_that_fails_still_prints_its_summary_line(tmp_path: Path, env: dict, no_model: None) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 3)
    tpl = write_template(tmp_path / "t.j2", "{{ missing }}")
    result = invoke(job_args(inp, tpl, tmp_path / "out.parquet", "--summary", "-"))
    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert set(summary) == TOP_KEYS and summary["job"]["rows"] == 0
    assert (summary["state"], summary["exit_code"]) == ("failed", 2) and "missing" in summary["error"]
    assert summary["input"] == str(inp)  # as a finished run names it, not a tuple's repr
    _utc(summary["started_at"])
    # a summary file is written only once the paths are checked: here it would overwrite the input
    before = inp.read_bytes()
    assert invoke(job_args(inp, tpl, tmp_path / "out.parquet", "--summary", str(inp))).exit_code == 2
    assert inp.read_bytes() == before


def test_rerun_of_a_finished_job_reports_the_same_keys_from_the_marker(tmp_path: Path, env: dict) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 6)
    tpl = write_template(tmp_path / "t.j2")
    out = tmp_path / "out.parquet"
    # no --chat/--no-chat: the demo model's chat template is used (chat resolved from the model)
    args = ["run", str(inp), "-t", str(tpl), "-o", str(out), "--max-tokens", "3", "--kv-cache-memory", "16MiB",
            "--summary", "-"]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert "already finished" in flat(again.stderr)
    one, two = checked_summary(first.stdout), checked_summary(again.stdout.splitlines()[-1])
    assert set(two["model"]) == set(one["model"]) and set(two["engine"]) == set(one["engine"])
    assert one["chat"] is True and two["chat"] is True
    assert two["model"] == one["model"] and two["model_dir"] == one["model_dir"]
    assert (two["state"], two["exit_code"], two["already_done"]) == ("finished", 0, True)
    assert two["job"] == {**one["job"], "rows_resumed": 6}
    assert two["attempt"]["rows"] == two["attempt"]["prompt_tokens"] == two["attempt"]["elapsed_s"] == 0


def test_resumed_run_counts_this_attempt_apart_from_the_job(tmp_path: Path, env: dict) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 120)
    out = tmp_path / "out.parquet"
    args = job_args(inp, write_template(tmp_path / "t.j2"), out, *SEEDED, "--checkpoint-rows", "30",
                    "--checkpoint-seconds", "1000")
    code, log = cli_process.run(args, {**env, "BATCHLLM_CRASH_AT": "manifest_update:2"})
    assert code == 137, log
    done_before = set(committed_row_ids(out.with_name(out.name + ".batchllm")))
    assert len(done_before) == 60
    summary_file = tmp_path / "summary.json"
    result = invoke([*args, "--summary", str(summary_file)])
    assert result.exit_code == 0, result.output
    summary = checked_summary(summary_file.read_text())
    att, job = summary["attempt"], summary["job"]
    assert (att["rows"], job["rows_resumed"], job["rows"], job["rows_total"]) == (60, 60, 120, 120)
    prompt = [r["response_prompt_tokens"] for r in read_rows(out)]
    assert job["prompt_tokens"] == sum(prompt)
    assert att["prompt_tokens"] == sum(n for i, n in enumerate(prompt) if i not in done_before)
    # the human report says the same, with this attempt's numbers
    text = flat(result.stderr)
    assert f"done: 120 rows (120 ok); this run: 60 rows in {att['elapsed_s']:.1f} s" in text
    assert (f"tokens: {att['prompt_tokens']} prompt ({att['prefix_hit_tokens']} reused), "
            f"{att['prefill_tokens']} prefilled") in text
    assert "resumed: 60 rows came from the checkpoint of an earlier run" in text


# ---- status exit codes, the early first shard, an interrupted run's summary ---------------------------
def test_status_of_nothing_on_disk_exits_12(tmp_path: Path) -> None:
    code, st = _status(tmp_path / "never.parquet")
    assert (code, st["state"]) == (12, "not started")
    assert invoke(["status", str(tmp_path)]).exit_code == 2  # a directory that is no run directory


def test_running_status_exits_10_then_sigterm_writes_an_interrupted_summary_and_status_exits_11(
    tmp_path: Path, env: dict
) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 4000)
    out = tmp_path / "out.parquet"
    summary_file = tmp_path / "summary.json"
    run_dir = out.with_name(out.name + ".batchllm")
    # a shard every 1,000,000 rows or 12 s: the first one comes after 1 s of results
    args = job_args(inp, write_template(tmp_path / "t.j2"), out, "--max-tokens", "16", "--checkpoint-rows",
                    "1000000", "--checkpoint-seconds", "12", "--summary", str(summary_file))
    proc = cli_process.start(args, env, tmp_path / "run.log")
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.running and not list(run_dir.glob("shard-*.json")):
            time.sleep(0.05)
        assert proc.running, proc.output
        code, st = _status(out)
        assert (code, st["state"], st["shards"]) == (10, "running", 1)
        assert 0 < st["rows_done"] < 4000
        created = json.loads((run_dir / "manifest.json").read_text())["created_at"]
        assert st["last_commit_at"] - created < 8  # not the 12 s of --checkpoint-seconds
        proc.kill(signal.SIGTERM)
        assert proc.wait(60) == 143, proc.output
    finally:
        proc.kill()
    summary = checked_summary(summary_file.read_text())
    assert (summary["state"], summary["exit_code"]) == ("interrupted", 143)
    assert "SIGTERM" in summary["error"] and "run the same command again" in summary["error"]
    code, st = _status(out)
    assert (code, st["state"]) == (11, "interrupted")
    assert summary["job"]["rows"] == st["rows_done"] == summary["attempt"]["rows"] > 0


def _summary_of_a_run_stopped_mid_plan(tmp_path: Path, env: dict, *extra: str) -> dict:
    """The summary of a plan-mode run over 3,000 rows sharing 20 long documents, stopped by SIGTERM
    once its first shard is committed (rows in flight, most of the plan not reached)."""
    inp = tmp_path / "in.csv"
    with inp.open("w", encoding="utf-8") as f:
        f.write("doc,q\n")
        for i in range(3000):
            f.write(f"document {i % 20} {' '.join(f'w{i % 20}x{k}' for k in range(60))},question {i}?\n")
    out = tmp_path / "out.parquet"
    run_dir = out.with_name(out.name + ".batchllm")
    summary_file = tmp_path / "summary.json"
    args = ["run", str(inp), "-t", str(write_template(tmp_path / "t.j2", "Doc: {{ doc }} Q: {{ q }}")), "-o",
            str(out), "--no-chat", "--max-tokens", "16", "--checkpoint-seconds", "1", "--summary", str(summary_file),
            *extra]
    proc = cli_process.start(args, env, tmp_path / "run.log")
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.running and not list(run_dir.glob("shard-*.json")):
            time.sleep(0.05)
        assert proc.running, proc.output
        proc.kill(signal.SIGTERM)
        assert proc.wait(60) == 143, proc.output
    finally:
        proc.kill()
    att = checked_summary(summary_file.read_text())["attempt"]
    assert 0 < att["rows"] < 3000 and (att["preemptions"], att["sharing_fallbacks"]) == (0, 0), att
    return att


def test_an_interrupted_summary_counts_reused_tokens_of_the_rows_it_reports(tmp_path: Path, env: dict) -> None:
    """The rows cut off had reused the shared prefixes too, but the summary reports only the rows that
    finished, so its reused tokens are theirs (they were over the prompt tokens: 4,746,166 reused of
    4,668,158 on a 60k-row job)."""
    att = _summary_of_a_run_stopped_mid_plan(tmp_path, env)
    assert 0 < att["prefix_hit_tokens"] <= att["prompt_tokens"], att


def test_an_interrupted_summary_counts_only_the_chunk_cuts_the_run_crossed(tmp_path: Path, env: dict) -> None:
    """With 100 chunks, a run stopped early crossed few cuts: each prefix spanning one was carried over,
    so nothing was computed again (the cuts it never reached were counted: 3,399 tokens over 52 chunks)."""
    att = _summary_of_a_run_stopped_mid_plan(tmp_path, env, "--plan-chunk-tokens", "20000")
    assert att["plan_chunks"] > 50 and att["plan_boundary_tokens"] == 0, att


def test_sigterm_while_planning_reports_the_time_planned_and_a_last_progress_line_that_says_planning(
    tmp_path: Path, env: dict
) -> None:
    """100,000 rows take seconds to tokenize and sort: a signal one second after the engine asked for its
    first chunk stops the run during the plan (it said plan_s 0.0 and `planning: false`)."""
    inp = write_rows_csv(tmp_path / "in.csv", 100_000)
    summary_file = tmp_path / "summary.json"
    args = job_args(inp, write_template(tmp_path / "t.j2"), tmp_path / "out.parquet", "--log-format", "json",
                    "--summary", str(summary_file))
    proc = cli_process.start(args, env, tmp_path / "run.log")
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.running and '"event": "start"' not in proc.output:
            time.sleep(0.05)
        assert proc.running, proc.output
        time.sleep(1.0)
        proc.kill(signal.SIGTERM)
        assert proc.wait(60) == 143, proc.output
    finally:
        proc.kill()
    summary = checked_summary(summary_file.read_text())
    att = summary["attempt"]
    assert (summary["state"], att["rows"], att["plan_chunks"]) == ("interrupted", 0, 0), att  # still planning
    assert att["plan_s"] >= 1.0 and att["elapsed_s"] == 0.0, att
    progress = [json.loads(ln) for ln in proc.output.splitlines() if ln.startswith('{"event": "progress"')]
    assert progress and progress[-1]["planning"] is True, proc.output


# ---- progress ----------------------------------------------------------------------------------------
def test_log_format_json_and_quiet(tmp_path: Path, env: dict) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 10)
    tpl = write_template(tmp_path / "t.j2")
    result = invoke(job_args(inp, tpl, tmp_path / "a.parquet", "--log-format", "json"))
    assert result.exit_code == 0, result.output
    # every line of stderr is one JSON object (a log pipeline parses each), the final report included
    events = [json.loads(ln) for ln in result.stderr.splitlines()]
    assert [e["event"] for e in events if e["event"] != "notice"][0] == "start"
    last = [e for e in events if e["event"] == "progress"][-1]
    _utc(last["time"])
    assert (last["rows_done"], last["rows_total"], last["errors"], last["eta_s"]) == (10, 10, 0, 0.0)
    assert last["prompt_tokens_per_s"] > 0 and last["output_tokens_per_s"] > 0
    done = events[-1]  # the --summary object as the last event
    assert (done["event"], done["state"], done["exit_code"], done["job"]["rows"]) == ("done", "finished", 0, 10)
    assert done["output"] == str(tmp_path / "a.parquet") and done["attempt"]["completion_tokens"] > 0
    _utc(done["time"])
    # a known error ends it the same way: one `error` event with the exit code
    refused = invoke(job_args(inp, str(tmp_path / "missing.j2"), tmp_path / "c.parquet", "--log-format", "json"))
    assert refused.exit_code == 2, refused.output
    error = [json.loads(ln) for ln in refused.stderr.splitlines()][-1]
    assert (error["event"], error["exit_code"]) == ("error", 2) and "missing.j2" in error["message"], error
    quiet = invoke(job_args(inp, tpl, tmp_path / "b.parquet", "--quiet"))
    assert quiet.exit_code == 0, quiet.output
    assert "Z run: " not in quiet.stderr and "done: 10 rows" in flat(quiet.stderr)


def test_eta_counts_token_work_of_rows_still_running() -> None:
    from batchllm_cli.job_types import WorkDone
    from batchllm_cli.progress import ProgressMeter

    # 10 s in: 1 of 100 rows finished (100 prompt + 10 output tokens), but 50 rows' prompts are
    # prefilled and 200 tokens generated: about half the work is done, so about 10 s are left
    work = WorkDone(rows=1, rows_run=1, prompt_tokens=100, completion_tokens=10, prompt_tokens_processed=5000,
                    output_tokens=200)
    line = ProgressMeter(100, 0, lambda: work, started=time.monotonic() - 10).line()
    assert line.eta_s == pytest.approx(11.2, abs=0.3)  # (11000 - 5200) / 520 tok/s; by finished rows: 990 s
    assert line.prompt_tokens_per_s == pytest.approx(500, rel=0.05) and line.rows_done == 1
    assert ProgressMeter(100, 0, lambda: WorkDone(prompt_tokens_processed=5000)).line().eta_s is None


def test_rates_and_eta_leave_out_the_wait_for_the_global_plan() -> None:
    # On 1M rows the engine waited ~140 s for the plan (every row tokenized and sorted); rates and the
    # ETA counted that wait as generation and came out ~3x too slow ("ETA 1 day, 6:58:26").
    import dataclasses
    from types import SimpleNamespace

    from batchllm_cli.job_report import AttemptTracker
    from batchllm_cli.job_types import WorkDone
    from batchllm_cli.planned_feed import PlanStats
    from batchllm_cli.progress import ProgressMeter

    tracker = AttemptTracker(SimpleNamespace(committed=SimpleNamespace(rows=0)), collector=None)
    tracker.feed = feed = SimpleNamespace(planning=True, stats=PlanStats(chunks=3))
    tracker._t0 = time.perf_counter() - 100
    assert tracker.generation_s() == 0.0  # still planning
    feed.planning, feed.stats = False, dataclasses.replace(feed.stats, first_wait_s=90.0)
    assert tracker.generation_s() == pytest.approx(10.0, abs=0.5)
    tracker.plan_stats.append(feed.stats)  # the pass ended: counted once
    assert tracker.generation_s() == pytest.approx(10.0, abs=0.5)

    work = WorkDone(rows=10, rows_run=10, prompt_tokens=1000, completion_tokens=100, prompt_tokens_processed=1000,
                    output_tokens=100, elapsed_s=10.0)
    line = ProgressMeter(20, 0, lambda: work, started=time.monotonic() - 100).line()
    assert (line.rows_per_s, line.eta_s, line.planning) == (1.0, 10.0, False)
    waiting = ProgressMeter(20, 0, lambda: WorkDone(elapsed_s=0.0)).line()
    assert waiting.planning and "planning: tokenizing and sorting every row" in waiting.text()


def test_printed_rates_agree_with_the_printed_elapsed_time_on_short_runs() -> None:
    from batchllm_cli.job_types import AttemptCounts

    # 9 rows in 30.55 ms: elapsed prints as 0.031; the rate must be 9 / 0.031, not 9 / 0.03055
    data = AttemptCounts(rows=9, prompt_tokens=90, completion_tokens=27, elapsed_s=0.03055).to_dict()
    assert data["elapsed_s"] == 0.031
    assert data["rows_per_s"] == pytest.approx(9 / 0.031, rel=1e-3)
    assert data["prompt_tokens_per_s"] == pytest.approx(90 / 0.031, rel=1e-3)
    assert data["output_tokens_per_s"] == pytest.approx(27 / 0.031, rel=1e-3)


def test_first_errors_are_listed_in_row_order(tmp_path: Path, env: dict) -> None:
    # The global plan runs rows sorted by prompt: errors came in that order ("row 43, 36, 6, 5, 7").
    inp = tmp_path / "in.csv"
    inp.write_text("text\n" + "".join(f"{chr(ord('z') - i) * 3} {'word ' * 60}\n" for i in range(5)))
    out, summary = tmp_path / "out.parquet", tmp_path / "s.json"
    result = invoke(job_args(inp, write_template(tmp_path / "t.j2"), out, "--kv-cache-tokens", "32",
                             "--summary", str(summary)))
    assert result.exit_code == 3, result.output
    rows = [e["row"] for e in json.loads(summary.read_text())["first_errors"]]
    assert rows == sorted(rows) and len(rows) == 5
    listed = [int(m) for m in re.findall(r"^\s+row (\d+):", result.stderr, flags=re.M)]
    assert listed == sorted(listed) and len(listed) == 5
