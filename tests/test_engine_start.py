"""A run the engine would refuse as it starts for a setting it cannot use (--attention-backend triton
without CUDA, a --kv-cache-memory or --kv-cache-tokens that holds no KV block) is refused before anything
is written, naming the option; the engine itself names the same option."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reliability_utils import invoke, one_error_line, write_rows_csv, write_template

# Demo model, a few tokens per row; no --kv-cache-memory (each case gives its own).
QUICK = ["--max-tokens", "3", "--no-chat", "--max-batch-tokens", "2048"]


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


def test_the_engine_names_the_kv_setting_that_leaves_no_block(demo_model_dir: Path) -> None:
    from engine import ConfigError, EngineConfig, LLMEngine

    with pytest.raises(ConfigError, match=r"^--kv-cache-tokens 0 leaves the KV cache no block of 16 tokens"):
        LLMEngine(EngineConfig(model_dir=str(demo_model_dir), device="cpu", kv_cache_tokens=0))
    with pytest.raises(ConfigError, match=r"^--kv-cache-memory 1.0KiB holds no KV cache block .* at least 64.0KiB\."):
        LLMEngine(EngineConfig(model_dir=str(demo_model_dir), device="cpu", dtype="float32", kv_cache_memory=1024))
