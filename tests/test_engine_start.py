"""A run the engine refuses as it starts: a setting it cannot use (--attention-backend triton without
CUDA, a KV budget that holds no block) is refused before anything is written; one found only as the
engine starts (a KV cache larger than host memory) leaves no run directory behind either, so `status`
says the job has not started instead of offering a resume the same command cannot make. A checkpoint
holding rows is kept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm_cli import durable
from reliability_utils import committed_row_ids, invoke, one_error_line, write_rows_csv, write_template

# Demo model, a few tokens per row; no --kv-cache-memory (each case gives its own).
QUICK = ["--max-tokens", "3", "--no-chat", "--max-batch-tokens", "2048"]
# More than any machine's address space: the allocation fails at once, touching no memory.
TOO_MUCH = "4096TiB"


def _job(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    inp = write_rows_csv(tmp_path / "in.csv", 6)
    return ["run", str(inp), "-t", str(write_template(tmp_path / "t.j2")), "-o", str(out), "-q", *QUICK, *extra]


def _status(out: Path) -> tuple[int, dict]:
    result = invoke(["status", str(out), "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("flags,says", [
    (["--attention-backend", "triton"], "--attention-backend triton: the triton attention backend needs a CUDA device"),
    (["--kv-cache-memory", "1"], "--kv-cache-memory 1 byte holds no KV cache block of 16 tokens"),
    (["--kv-cache-tokens", "0"], "--kv-cache-tokens 0 leaves the KV cache no block"),
])
def test_a_setting_the_engine_cannot_start_with_is_refused_before_anything_is_written(
    tmp_path: Path, env: dict[str, str], no_model: None, monkeypatch: pytest.MonkeyPatch, flags: list[str], says: str,
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conftest turns Triton's CPU interpreter on
    out = tmp_path / "new" / "out.jsonl"
    result = invoke(_job(tmp_path, out, "--kv-cache-memory", "16MiB", *flags))
    assert result.exit_code == 2, result.output
    assert says in one_error_line(result.stderr)
    assert not (tmp_path / "new").exists()  # not even the output's directory
    code, st = _status(out)
    assert (code, st["state"]) == (12, "not started")


def test_a_kv_cache_larger_than_memory_is_one_line_and_leaves_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "new" / "out.jsonl"
    result = invoke(_job(tmp_path, out, "--kv-cache-memory", TOO_MUCH))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith("error: Cannot allocate a KV cache of ") and line.endswith(
        "; lower --kv-cache-memory (or --kv-cache-tokens).")
    assert not (tmp_path / "new").exists()
    code, st = _status(out)
    assert (code, st["state"]) == (12, "not started")


def test_a_checkpoint_holding_rows_is_kept_when_the_engine_refuses_to_start(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out.jsonl"
    run_dir = tmp_path / "out.jsonl.batchllm"
    args = _job(tmp_path, out, "--checkpoint-rows", "2")
    # the first run is stopped by SIGTERM once its first shard is committed
    monkeypatch.setattr(durable, "_crash_counts", {})
    monkeypatch.setenv("BATCHLLM_SIGNAL_AT", "manifest_update")
    assert invoke([*args, "--kv-cache-memory", "16MiB"]).exit_code == 143
    monkeypatch.delenv("BATCHLLM_SIGNAL_AT")
    kept = committed_row_ids(run_dir)
    assert kept

    result = invoke([*args, "--kv-cache-memory", TOO_MUCH])  # not part of the job: same checkpoint
    assert result.exit_code == 2 and "Cannot allocate a KV cache" in one_error_line(result.stderr)
    assert committed_row_ids(run_dir) == kept
    code, st = _status(out)
    assert (code, st["state"]) == (11, "interrupted")
    assert invoke([*args, "--kv-cache-memory", "16MiB"]).exit_code == 0  # and it resumes


def test_the_engine_names_the_kv_setting_that_leaves_no_block(demo_model_dir: Path) -> None:
    from engine import ConfigError, EngineConfig, LLMEngine

    with pytest.raises(ConfigError, match=r"^--kv-cache-tokens 0 leaves the KV cache no block of 16 tokens"):
        LLMEngine(EngineConfig(model_dir=str(demo_model_dir), device="cpu", kv_cache_tokens=0))
    with pytest.raises(ConfigError, match=r"^--kv-cache-memory 1.0KiB holds no KV cache block .* at least 64.0KiB\."):
        LLMEngine(EngineConfig(model_dir=str(demo_model_dir), device="cpu", dtype="float32", kv_cache_memory=1024))


@pytest.mark.parametrize("tokens,blocks,option", [(None, 8, "--kv-cache-memory"), (128, 8, "--kv-cache-tokens"),
                                                  (4096, 8, "--kv-cache-memory")])
def test_dropped_shared_prefixes_name_the_option_that_sized_the_kv_cache(
    tokens: int | None, blocks: int, option: str,
) -> None:
    from rich.console import Console

    from batchllm_cli.job_types import AttemptCounts, RunReport, RunSettings
    from batchllm_cli.report_render import render_report

    report = RunReport(state="finished", exit_code=0, started_at=0.0, finished_at=0.0, input="in.csv",
                       output="out.jsonl", attempt=AttemptCounts(sharing_fallbacks=2),
                       engine={"kv_blocks_total": blocks})
    settings = RunSettings(input="in.csv", template="t", output=Path("out.jsonl"), kv_cache_tokens=tokens)
    console = Console(record=True, width=300)
    render_report(report, console, settings)
    assert f"2 shared prefixes dropped for lack of KV memory (raise {option})" in console.export_text()

