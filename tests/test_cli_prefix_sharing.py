"""`batchllm run --prefix-sharing plan|lru|none`: same output, and the summary says what was saved.
`--attention-backend triton` (Triton interpreter on CPU) gives the same output as torch."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm_cli.app import app

SYSTEM = "You are a careful assistant. Read the review and answer with one word: positive or negative. " * 3


@pytest.fixture()
def shared_table(tmp_path: Path) -> tuple[Path, Path]:
    rows = ["great", "awful", "fine", "great", "meh", "superb service", "late delivery", "great"]
    table = tmp_path / "reviews.jsonl"
    table.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(rows)))
    template = tmp_path / "t.j2"
    template.write_text(SYSTEM + "Review: {{ text }}\nAnswer:")
    return table, template


def _run(tmp_path: Path, table: Path, template: Path, model: Path, name: str, *flags: str) -> tuple[list, dict]:
    out = tmp_path / f"{name}.parquet"
    summary = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, [
        "run", str(table), "--template", str(template), "--output", str(out), "--model", str(model),
        "--max-tokens", "5", "--kv-cache-memory", "16MiB", "--max-batch-tokens", "64",
        "--summary", str(summary), *flags,
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(summary.read_text())
    return pq.read_table(out).column("response").to_pylist(), {**data, **data["attempt"]}


def test_sharing_modes_same_answers_plan_computes_least(tmp_path, shared_table, demo_model_dir) -> None:
    table, template = shared_table
    answers = {}
    summaries = {}
    for mode in ("plan", "lru", "none"):
        answers[mode], summaries[mode] = _run(tmp_path, table, template, demo_model_dir, mode, "--prefix-sharing", mode)
    assert answers["plan"] == answers["lru"] == answers["none"]
    plan, lru, none = summaries["plan"], summaries["lru"], summaries["none"]
    assert none["prefill_tokens"] == none["prompt_tokens"] and none["prefix_hit_tokens"] == 0
    assert plan["prefill_tokens"] == plan["unique_prompt_tokens"] < lru["prefill_tokens"] < none["prefill_tokens"]
    assert plan["prefix_hit_tokens"] > 0 and plan["prefix_sharing"] == "plan"
    for key in ("peak_kv_blocks", "preemptions", "elapsed_s", "sharing_fallbacks"):
        assert key in plan
    # on CPU: the PyTorch backend, decode attention compiled where a compiler is found, and no CUDA graphs
    assert plan["model"]["attention_backend"] == "torch" and plan["model"]["cuda_graphs"] is False
    from kernels.cpu_library import native_library_problem
    problem = native_library_problem()
    assert plan["model"]["decode_attention"] == ("compiled" if problem is None else f"torch ({problem})")
    assert plan["engine"]["cuda_graph_steps"] == 0


def test_kv_cache_tokens_caps_the_cache(tmp_path, shared_table, demo_model_dir) -> None:
    table, template = shared_table
    _, summary = _run(tmp_path, table, template, demo_model_dir, "capped", "--kv-cache-tokens", "512", "--block-size", "16")
    assert summary["engine"]["kv_blocks_total"] == 32


def test_triton_backend_matches_torch(tmp_path, shared_table, demo_model_dir) -> None:
    table, _ = shared_table
    # the Triton interpreter runs kernel programs one by one: keep the job tiny (the demo model's
    # tokens are bytes) but with a shared prefix of several blocks, chunked prefill and group decode
    template = tmp_path / "short.j2"
    template.write_text("Answer positive or negative, in one word. Review: {{ text }}\nAnswer:")
    small = ("--limit", "4", "--max-tokens", "3", "--max-batch-tokens", "48")
    torch_answers, _ = _run(tmp_path, table, template, demo_model_dir, "torch", "--attention-backend", "torch", *small)
    triton_answers, _ = _run(tmp_path, table, template, demo_model_dir, "triton", "--attention-backend", "triton", *small)
    assert triton_answers == torch_answers


def test_plan_prefill_within_2_percent_of_analyze_optimum(tmp_path, shared_table, demo_model_dir) -> None:
    table, template = shared_table
    _, summary = _run(tmp_path, table, template, demo_model_dir, "plan2")
    report = tmp_path / "analyze.json"
    result = CliRunner().invoke(app, [
        "analyze", str(table), "--template", str(template), "--model", str(demo_model_dir), "--json", str(report),
    ])
    assert result.exit_code == 0, result.output
    analyzed = json.loads(report.read_text())
    assert analyzed["prompt_tokens"] == summary["prompt_tokens"]
    assert summary["prefill_tokens"] <= 1.02 * analyzed["unique_prompt_tokens"]
