"""Greedy rows take the first of equally likely tokens (the same answer on every run and engine),
in an all-greedy batch and beside sampled rows."""
from __future__ import annotations

import torch

from engine.sampler import SamplingTensors, sample


def test_greedy_takes_the_first_maximal_token() -> None:
    logits = torch.full((3, 50), -1.0)
    logits[0, [7, 3, 40]] = 2.0  # a three-way tie: token 3 first
    logits[1, [49, 48]] = 30.0  # sampled from these two (the others are e^-31 as likely)
    logits[2, 0] = 1.0
    empty = torch.empty(0)
    greedy = SamplingTensors(empty, empty, empty, empty, empty, all_greedy=True, any_top_k=False, any_top_p=False)
    assert sample(logits, greedy).tolist() == [3, 48, 0]
    mixed = SamplingTensors(
        temperatures=torch.tensor([0.0, 1.0, 0.0]), top_ks=torch.zeros(3, dtype=torch.int64), top_ps=torch.ones(3),
        keys=torch.tensor([1, 2, 3]), steps=torch.zeros(3, dtype=torch.int64),
        all_greedy=False, any_top_k=False, any_top_p=False)
    out = sample(logits, mixed).tolist()
    assert out[0] == 3 and out[2] == 0 and out[1] in (48, 49)


def test_a_row_with_nan_scores_gets_the_nan_marker_greedy_or_sampled() -> None:
    from engine.sampler import NAN_SCORES

    logits = torch.randn(4, 50)
    logits[1, 17] = float("nan")  # one NaN score in the row is enough: nothing about it can be trusted
    logits[3] = float("nan")
    empty = torch.empty(0)
    greedy = SamplingTensors(empty, empty, empty, empty, empty, all_greedy=True, any_top_k=False, any_top_p=False)
    got = sample(logits, greedy).tolist()
    assert got[1] == got[3] == NAN_SCORES and got[0] == int(logits[0].argmax()) and got[2] >= 0
    mixed = SamplingTensors(
        temperatures=torch.tensor([1.0, 0.7, 0.0, 1.0]), top_ks=torch.tensor([0, 5, 0, 5]), top_ps=torch.ones(4),
        keys=torch.tensor([1, 2, 3, 4]), steps=torch.zeros(4, dtype=torch.int64),
        all_greedy=False, any_top_k=True, any_top_p=False)
    got = sample(logits, mixed).tolist()
    assert got[1] == got[3] == NAN_SCORES and got[0] >= 0 and got[2] >= 0


def test_nan_scores_end_the_row_as_an_error_not_as_token_text(tiny_model_dir) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=1024))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    healthy = {r.key: r for r in engine.generate([(0, [5, 6, 7], params)])}
    assert healthy[0].error is None and len(healthy[0].token_ids) == 4
    with torch.no_grad():
        engine.runner.model.model.norm.weight.fill_(float("nan"))  # as a broken checkpoint would
    results = {r.key: r for r in engine.generate([(1, [5, 6, 7], params), (2, [9, 10], params)])}
    for r in results.values():
        assert r.finish_reason == "error" and r.token_ids == () and "NaN" in r.error
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_tiny_temperature_is_greedy_and_an_infinite_one_is_refused(tiny_model_dir) -> None:
    # logits / 1e-38 overflowed to inf, the softmax to NaN, and every row answered token 0 with exit 0.
    import pytest

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", kv_cache_tokens=1024))
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]

    def answers(temperature: float) -> list[tuple[int, ...]]:
        params = SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True, seed=1)
        done = {r.key: r.token_ids for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
        return [done[i] for i in range(len(prompts))]

    greedy = answers(0.0)
    assert answers(1e-38) == answers(1e-6) == greedy
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
