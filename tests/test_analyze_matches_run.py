"""`analyze` reports the plan `run` executes: on random tables, its plan prefill is the engine's
prefill in plan mode (one wave, roomy cache) and the prompts' naive trie token count."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from batchllm_cli.analyze import AnalyzeSettings, analyze, prepare_analyze
from batchllm_cli.prompts import PromptEncoder, PromptRow, iter_prompts
from engine import EngineConfig, LLMEngine, SamplingParams

TEMPLATE = "Task {{ task }}. Context: {{ context }}. Item: {{ item }}"
WORDS = ["alpha", "beta", "gamma delta", "the same long context repeated " * 3]
_engines: dict[str, LLMEngine] = {}


def engine_for(model: Path) -> LLMEngine:
    """One engine for every example (building one per example would dominate the test's time);
    its stats accumulate, so callers take differences."""
    if str(model) not in _engines:
        _engines[str(model)] = LLMEngine(EngineConfig(
            model_dir=str(model), prefix_sharing="plan", block_size=4, kv_cache_tokens=8192, max_batch_tokens=64,
        ))
    return _engines[str(model)]


def naive_trie_tokens(prompts: list[list[int]]) -> int:
    return len({tuple(p[: k + 1]) for p in prompts for k in range(len(p))})


table_rows = st.lists(
    st.fixed_dictionaries({
        "task": st.sampled_from(["sort", "rank"]),
        "context": st.sampled_from(WORDS),
        "item": st.text(alphabet="ab c", max_size=6),
    }),
    min_size=1,
    max_size=10,
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=table_rows)
def test_analyze_plan_prefill_is_runs_prefill(tiny_model_dir, rows: list[dict[str, str]]) -> None:
    model = tiny_model_dir("llama_gqa")
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "in.jsonl"
        table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        template = Path(tmp) / "t.j2"
        template.write_text(TEMPLATE, encoding="utf-8")
        options = AnalyzeSettings(input=table, template=str(template), model=model, chat=False, max_tokens=2, block_size=4)
        report = analyze(options)
        # The prompts exactly as `run` builds them: the same encoder over the same table.
        prepared = prepare_analyze(options)
        try:
            encoder = PromptEncoder(prepared.template, prepared.tokenizer, prepared.chat)
            prompts = [r.token_ids for r in iter_prompts(prepared.source, encoder) if isinstance(r, PromptRow)]
        finally:
            prepared.close()
    assert len(prompts) == len(rows) == report.rows_planned
    engine = engine_for(model)
    before = engine.stats()
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    results = list(engine.generate((i, p, params) for i, p in enumerate(prompts)))
    after = engine.stats()
    assert len(results) == len(prompts)
    assert after.preemptions == before.preemptions and after.sharing_fallbacks == before.sharing_fallbacks
    engine_prefill = after.prefill_tokens - before.prefill_tokens
    assert report.prompt_tokens == sum(map(len, prompts))
    assert report.plan_prefill_tokens == report.unique_prompt_tokens == engine_prefill == naive_trie_tokens(prompts)
