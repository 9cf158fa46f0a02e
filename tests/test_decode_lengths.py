"""Admission learns how long answers are (engine/scheduler.py, `learn_decode_lengths`): once enough
rows have finished, decode growth is reserved up to the longest finished answer instead of
max tokens, so more rows fit in a tight cache; the tokens are the same either way."""
from __future__ import annotations

import random

import model_factory
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import LENGTH_SAMPLES


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(7)
    vocab = model_factory.tokenizer_size() - 10
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(20, 60))] for _ in range(n)]


def _run(model_dir, prompts, params, learn: bool, sharing: str = "none"):
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), max_batch_tokens=256, block_size=16,
                                    kv_cache_tokens=1024, prefix_sharing=sharing, learn_decode_lengths=learn))
    out = {r.key: (r.token_ids, r.finish_reason) for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    return out, engine.stats(), engine.scheduler


def test_short_answers_under_a_generous_max_tokens_run_more_rows_at_once(tiny_model_dir) -> None:
    model = tiny_model_dir("llama_gqa")
    prompts = _prompts(4 * LENGTH_SAMPLES)
    # half the vocabulary ends a row: answers of a few tokens, max tokens 48
    params = SamplingParams(max_tokens=48, stop_token_ids=tuple(range(0, model_factory.tokenizer_size(), 2)))
    for sharing in ("none", "plan"):
        fixed, fixed_stats, _ = _run(model, prompts, params, learn=False, sharing=sharing)
        learned, learned_stats, scheduler = _run(model, prompts, params, learn=True, sharing=sharing)
        assert learned == fixed
        assert any(reason == "stop" for _, reason in learned.values())
        assert scheduler.typical_completion is not None and 0 < scheduler.typical_completion < params.max_tokens
        # the same work in fewer, fuller steps
        assert learned_stats.steps < fixed_stats.steps, (sharing, learned_stats.steps, fixed_stats.steps)


def test_rows_that_use_all_their_max_tokens_keep_the_full_reservation(tiny_model_dir) -> None:
    model = tiny_model_dir("llama_gqa")
    prompts = _prompts(2 * LENGTH_SAMPLES)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    fixed, fixed_stats, _ = _run(model, prompts, params, learn=False)
    learned, learned_stats, scheduler = _run(model, prompts, params, learn=True)
    assert learned == fixed
    assert scheduler.typical_completion == params.max_tokens
    assert learned_stats.steps == fixed_stats.steps and learned_stats.preemptions == fixed_stats.preemptions == 0
