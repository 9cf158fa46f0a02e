"""`run --prefix-sharing plan` plans the whole table at once: a prefix is computed once per job however
the rows are ordered, and the job is fed to the engine in chunks cut where the fewest tokens are shared.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batchllm_cli.app import app
from engine import PackedSequences, PlanChunk, cut_sorted_rows, sort_sequences, unique_prompt_tokens


def _naive_trie_tokens(prompts: list[list[int]]) -> int:
    return len({tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)})


@st.composite
def _prompt_sets(draw: st.DrawFn) -> list[list[int]]:
    """Prompts built from a few shared openings and documents, so the trie has depth and duplicates."""
    alphabet = st.integers(1, 6)
    heads = draw(st.lists(st.lists(alphabet, min_size=0, max_size=5), min_size=1, max_size=3))
    docs = draw(st.lists(st.lists(alphabet, min_size=0, max_size=12), min_size=1, max_size=4))
    n = draw(st.integers(1, 40))
    out = []
    for _ in range(n):
        tail = draw(st.lists(alphabet, min_size=0, max_size=4))
        p = draw(st.sampled_from(heads)) + draw(st.sampled_from(docs)) + tail
        out.append(p or [1])
    return out


@given(prompts=_prompt_sets(), budget=st.integers(1, 80))
@settings(max_examples=100, deadline=None)
def test_cuts_cover_the_sorted_rows_within_budget_and_count_what_spans_them(prompts, budget) -> None:
    ordered = sort_sequences(PackedSequences.from_lists(prompts))
    lengths = np.array([len(prompts[i]) for i in ordered.order], dtype=np.int64)
    cuts = cut_sorted_rows(lengths, ordered.lcp, budget)
    starts = cuts.starts.tolist()
    assert starts[0] == 0 and starts[-1] == len(prompts) and all(a < b for a, b in zip(starts, starts[1:]))
    for a, b in zip(starts, starts[1:]):
        assert b - a == 1 or int(lengths[a:b].sum()) <= budget
    assert cuts.boundary_tokens == sum(int(ordered.lcp[p]) for p in starts[1:-1])
    assert unique_prompt_tokens(lengths, ordered.lcp) == _naive_trie_tokens(prompts)
    # the chunks' own tries add up to the whole trie plus exactly what spans the cuts
    per_chunk = sum(_naive_trie_tokens([prompts[i] for i in ordered.order[a:b]]) for a, b in zip(starts, starts[1:]))
    assert per_chunk == _naive_trie_tokens(prompts) + cuts.boundary_tokens


def _plan_engine(model_dir: Path):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    config = EngineConfig(str(model_dir), device="cpu", dtype="float32", max_batch_tokens=64,
                          kv_cache_tokens=4096, prefix_sharing="plan")
    return LLMEngine(config)


@pytest.fixture(scope="module")
def plan_engine(tmp_path_factory: pytest.TempPathFactory):
    from engine.demo_model import ensure_demo_model

    return _plan_engine(ensure_demo_model(tmp_path_factory.mktemp("demo")))


@given(prompts=_prompt_sets(), budget=st.integers(1, 120))
@example(prompts=[[1, 1, 1]] * 4, budget=6)  # a cut between duplicates: the copies after it use the kept logits
@example(prompts=[[1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 4]], budget=6)
# derandomized: the demo model has float near-ties on some drawn prompts (a 2e-6 top-2 logit margin was
# drawn once), where a different summation order legitimately picks the other token; fixed examples
# keep CI from failing on such a draw.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True, database=None)
def test_engine_computes_each_prefix_once_across_chunk_cuts(plan_engine, prompts, budget) -> None:
    from engine import SamplingParams

    prompts = [[t + 40 for t in p] for p in prompts]  # printable bytes for the demo tokenizer
    ordered = sort_sequences(PackedSequences.from_lists(prompts))
    order = ordered.order.tolist()
    lengths = np.array([len(prompts[i]) for i in order], dtype=np.int64)
    cuts = cut_sorted_rows(lengths, ordered.lcp, budget).starts.tolist()
    params = SamplingParams(max_tokens=2)
    chunks = [PlanChunk([(i, prompts[i], params) for i in order[a:b]], int(ordered.lcp[b]) if b < len(order) else 0)
              for a, b in zip(cuts[:-1], cuts[1:])]
    before = plan_engine.stats()
    results = {r.key: r.token_ids for r in plan_engine.generate_planned(chunks)}
    after = plan_engine.stats()
    assert after.prefill_tokens - before.prefill_tokens == _naive_trie_tokens(prompts)
    assert after.unique_prompt_tokens - before.unique_prompt_tokens == _naive_trie_tokens(prompts)
    assert after.cut_recomputed_tokens == before.cut_recomputed_tokens  # every cut's prefix was carried
    assert not plan_engine.scheduler.pinned and plan_engine.block_manager.num_free_blocks == plan_engine.block_manager.num_blocks
    # the same answers as in one wave
    whole = {r.key: r.token_ids for r in plan_engine.generate_planned([PlanChunk([(i, p, params) for i, p in enumerate(prompts)])])}
    assert results == whole


def test_a_run_stopped_after_a_chunk_is_handed_out_counts_no_cut_it_did_not_cross(demo_model_dir, monkeypatch) -> None:
    """A signal can land between handing the engine the chunk after a cut and the engine adopting the
    carried prefix; the tokens across that cut were not computed again (the CI saw a summary say 16 were):
    the engine counts a cut only as it adopts the carry."""
    import engine.llm_engine as llm_engine
    from engine import SamplingParams

    class Stop(BaseException):
        pass

    params = SamplingParams(max_tokens=2)
    doc = [50 + i % 40 for i in range(40)]
    chunks = [PlanChunk([(k, doc + [60 + k], params) for k in range(2)], len(doc)),
              PlanChunk([(k, doc + [60 + k], params) for k in range(2, 4)], 0)]
    real_plan, calls = llm_engine.plan_execution, []

    def plan_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second chunk is handed out: stop before its plan exists
            raise Stop
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "plan_execution", plan_then_stop)
    engine = _plan_engine(demo_model_dir)
    with pytest.raises(Stop):
        list(engine.generate_planned(chunks))
    assert len(calls) == 2 and engine.stats().cut_recomputed_tokens == 0


QUESTIONS = ["What is the main topic?", "Who is involved?", "When did it happen?", "Where was it?",
             "Why does it matter?", "What comes next?"]


def _doc_qa_table(tmp_path: Path, docs: int = 6) -> tuple[Path, Path]:
    rng = random.Random(7)
    words = ["river", "market", "engine", "harvest", "council", "signal", "orbit", "ledger", "canyon", "festival"]
    rows = []
    for d in range(docs):
        text = f"#{d}: " + " ".join(rng.choice(words) for _ in range(40))
        rows += [{"doc": text, "question": q} for q in QUESTIONS]
    rng.shuffle(rows)  # every document's rows spread over the table
    table = tmp_path / "qa.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "qa.j2"
    template.write_text("Document {{ doc }}\nAnswer from the document above. Question: {{ question }}\nAnswer:")
    return table, template


def _run(tmp_path: Path, table: Path, template: Path, model: Path, name: str, *flags: str) -> tuple[list, dict]:
    out = tmp_path / f"{name}.parquet"
    summary = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, [
        "run", str(table), "--template", str(template), "--output", str(out), "--model", str(model),
        "--max-tokens", "3", "--kv-cache-tokens", "8192", "--max-batch-tokens", "256",
        "--summary", str(summary), *flags,
    ])
    assert result.exit_code == 0, result.output
    return pq.read_table(out).column("response").to_pylist(), json.loads(summary.read_text())["attempt"]


def test_shuffled_table_computes_each_document_once_across_chunks(tmp_path, demo_model_dir) -> None:
    table, template = _doc_qa_table(tmp_path)
    report = tmp_path / "analyze.json"
    result = CliRunner().invoke(app, [
        "analyze", str(table), "--template", str(template), "--model", str(demo_model_dir), "--json", str(report),
    ])
    assert result.exit_code == 0, result.output
    analyzed = json.loads(report.read_text())

    # about two documents' rows per chunk: several chunks, each cut between documents
    answers, plan = _run(tmp_path, table, template, demo_model_dir, "plan", "--plan-chunk-tokens", "4000")
    assert plan["plan_chunks"] >= 3
    assert plan["unique_prompt_tokens"] == analyzed["unique_prompt_tokens"]
    # each prefix computed once, also those that span a cut (carried from one chunk to the next)
    assert plan["prefill_tokens"] == plan["unique_prompt_tokens"] and plan["plan_boundary_tokens"] == 0
    assert plan["engine_wait_s"] >= 0 and plan["plan_s"] > 0

    # planning the table in table-order waves instead computes documents again (the old behaviour)
    baseline, none = _run(tmp_path, table, template, demo_model_dir, "none", "--prefix-sharing", "none")
    assert answers == baseline
    assert none["plan_chunks"] == 0 and none["prefill_tokens"] == none["prompt_tokens"]


def test_resume_plans_only_the_rows_not_committed(tmp_path, demo_model_dir, monkeypatch) -> None:
    import torch

    import engine.llm_engine

    table, template = _doc_qa_table(tmp_path)
    original = engine.llm_engine.LLMEngine._run_waves

    def fails_after_ten(self, waves, planned):  # noqa: ANN001, ANN202
        for i, result in enumerate(original(self, waves, planned)):
            if i == 10:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield result

    with monkeypatch.context() as mp:
        mp.setattr(engine.llm_engine.LLMEngine, "_run_waves", fails_after_ten)
        out = tmp_path / "resumed.parquet"
        args = ["run", str(table), "--template", str(template), "--output", str(out), "--model",
                str(demo_model_dir), "--max-tokens", "3", "--kv-cache-tokens", "8192", "--max-batch-tokens", "256",
                "--checkpoint-rows", "1", "--plan-chunk-tokens", "4000"]
        first = CliRunner().invoke(app, args)
    assert first.exit_code == 75, first.output
    summary = tmp_path / "resumed.json"
    second = CliRunner().invoke(app, [*args, "--summary", str(summary)])
    assert second.exit_code == 0, second.output
    summary_json = json.loads(summary.read_text())
    report = summary_json["attempt"]
    assert summary_json["job"]["rows_resumed"] >= 10
    # the second attempt planned only its own rows: fewer than the whole job, each prefix once
    _, full = _run(tmp_path, table, template, demo_model_dir, "full", "--plan-chunk-tokens", "4000")
    assert report["unique_prompt_tokens"] < full["unique_prompt_tokens"]
    assert report["prefill_tokens"] == report["unique_prompt_tokens"]
    assert pq.read_table(out).column("response").to_pylist() == pq.read_table(tmp_path / "full.parquet").column("response").to_pylist()


def test_spool_rows_read_back_exactly(tmp_path: Path) -> None:
    from batchllm_cli.token_spool import TokenSpool

    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 50_000, size=int(n)).tolist() for n in rng.integers(0, 40, size=200)]
    spool = TokenSpool(tmp_path)
    for start in range(0, len(rows), 64):  # appended batch by batch, as the feed does
        batch = rows[start : start + 64]
        lengths = np.array([len(r) for r in batch], dtype=np.int64)
        tokens = np.array([t for r in batch for t in r], dtype=np.int32)
        spool.append(np.arange(start, start + len(batch)), tokens, lengths)
    with spool.row_reader() as row:
        assert [row(i) for i in reversed(range(len(rows)))] == rows[::-1]


def test_one_memory_estimate_chooses_the_sort_and_both_sorts_agree(tmp_path: Path) -> None:
    # analyze (analyze._plan) and run (sort_spool) both decide with choose_sort
    from batchllm_cli.token_spool import TokenSpool, choose_sort, estimate_plan_memory, sort_spool

    rng = np.random.default_rng(5)
    heads = [rng.integers(0, 9, size=8).tolist() for _ in range(4)]
    rows = [heads[int(rng.integers(0, 4))] + rng.integers(0, 9, size=int(rng.integers(0, 6))).tolist()
            for _ in range(300)]
    spool = TokenSpool(tmp_path)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    spool.append(np.arange(len(rows)), np.array([t for r in rows for t in r], dtype=np.int32), lengths)
    estimate = estimate_plan_memory(spool.tokens, len(rows))

    # the estimate decides (in memory up to the budget, inclusive) unless the user forces either way
    assert not choose_sort(spool.tokens, len(rows), estimate).out_of_core
    assert choose_sort(spool.tokens, len(rows), estimate - 1).out_of_core
    assert not choose_sort(spool.tokens, len(rows), 0, out_of_core=False).out_of_core
    forced = choose_sort(spool.tokens, len(rows), 1 << 60, out_of_core=True)
    assert forced.out_of_core and forced.forced

    # run's sort takes the same decision, and both sorts give the same order and LCPs
    in_memory = sort_spool(spool, estimate, tmp_path)
    on_disk = sort_spool(spool, estimate - 1, tmp_path)
    assert (in_memory[2], on_disk[2]) == (False, True)
    assert np.array_equal(in_memory[0], on_disk[0]) and np.array_equal(in_memory[1], on_disk[1])
    ordered = sort_sequences(PackedSequences(np.array([t for r in rows for t in r], dtype=np.int32),
                                             np.concatenate([[0], np.cumsum(lengths)])))
    assert np.array_equal(in_memory[0], ordered.order)
