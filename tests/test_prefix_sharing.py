"""Prefix-sharing execution: plan, lru and none modes give identical outputs; plan computes each
shared token once; memory pressure degrades sharing instead of deadlocking."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import model_factory
from engine import block_manager
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.9, top_p=0.9, seed=3)


def multi_level_prompts() -> list[list[int]]:
    """System prompts (one longer than the 64-token step) x few-shot blocks x row tails, plus exact
    duplicates, rows that end where others continue (empty suffix), and unshared rows."""
    rng = random.Random(5)
    vocab = model_factory.tokenizer_size() - 10

    def toks(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    systems = [toks(150), toks(37), toks(9)]
    shots = [toks(23), toks(0), toks(40)]
    prompts = [s + f + toks(rng.randrange(0, 12)) for s in systems for f in shots for _ in range(3)]
    prompts += [list(prompts[0]), list(prompts[0]), list(prompts[7])]  # duplicates
    prompts += [systems[1] + shots[0], systems[1] + shots[0]]  # end exactly at a shared node
    prompts += [toks(rng.randrange(1, 30)) for _ in range(4)]  # nothing shared
    return [p for p in prompts if p]


def run_mode(model_dir, prompts, params, sharing: str, **overrides) -> tuple[dict, object]:
    config = dict(model_dir=str(model_dir), max_batch_tokens=64, block_size=16, kv_cache_tokens=4096)
    config.update(overrides)
    engine = LLMEngine(EngineConfig(prefix_sharing=sharing, **config))
    out = {r.key: (r.token_ids, r.finish_reason) for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    return out, engine.stats()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_modes_agree_and_plan_prefills_each_shared_token_once(tiny_model_dir, params) -> None:
    prompts = multi_level_prompts()
    model = tiny_model_dir("llama_gqa")
    plan, plan_stats = run_mode(model, prompts, params, "plan")
    lru, lru_stats = run_mode(model, prompts, params, "lru")
    none, none_stats = run_mode(model, prompts, params, "none")
    assert plan == none and lru == none
    total = sum(map(len, prompts))
    assert none_stats.prefill_tokens == total and none_stats.prefix_hit_tokens == 0
    assert plan_stats.prefill_tokens <= 1.02 * plan_stats.unique_prompt_tokens
    assert plan_stats.prefill_tokens < lru_stats.prefill_tokens < total
    assert plan_stats.sharing_fallbacks == 0 and plan_stats.preemptions == 0


def test_prefix_larger_than_memory_falls_back_without_deadlock(tiny_model_dir) -> None:
    prompts = multi_level_prompts()
    model = tiny_model_dir("llama_gqa")
    reference, _ = run_mode(model, prompts, GREEDY, "none")
    # 224 tokens of cache: the longest row (201 tokens + 6 new) fits alone, but with the 150-token
    # system prompt and its few-shot children pinned, members cannot all be admitted
    got, stats = run_mode(model, prompts, GREEDY, "plan", kv_cache_tokens=224)
    assert got == reference
    assert stats.sharing_fallbacks > 0


def test_fallback_happens_with_asserts_off(tiny_model_dir) -> None:
    """`python -O` strips asserts: the scheduler's fallback once lived inside one, and the same job
    then looped forever."""
    model = tiny_model_dir("llama_gqa")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_prefix_sharing import GREEDY, multi_level_prompts, run_mode;"
        "_, stats = run_mode(sys.argv[2], multi_level_prompts(), GREEDY, 'plan', kv_cache_tokens=224);"
        "sys.exit(0 if stats.sharing_fallbacks > 0 else 3)"
    )
    tests_dir = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-O", "-c", script, tests_dir, str(model)], timeout=120)
    assert done.returncode == 0


def test_preemption_under_optimistic_admission_keeps_outputs(tiny_model_dir) -> None:
    prompts = multi_level_prompts()
    model = tiny_model_dir("llama_gqa")
    reference, _ = run_mode(model, prompts, GREEDY, "none")
    for sharing in ("plan", "lru"):
        got, stats = run_mode(model, prompts, GREEDY, sharing, kv_cache_tokens=400, decode_reservation=0.0)
        assert got == reference, sharing
        assert stats.preemptions > 0, sharing


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("k", tokens, GREEDY, 4)


def test_block_manager_copy_on_write_of_a_partial_prefix_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prefix = _seq(list(range(6)))
    bm.grow(prefix, 6)  # 2 blocks, the second half full
    member = _seq(list(range(9)))
    bm.start_on_prefix(member, prefix.block_table, 6)
    assert member.block_table[0] == prefix.block_table[0] and bm.ref_counts[prefix.block_table[0]] == 2
    assert member.block_table[1] != prefix.block_table[1]
    assert bm.take_pending_copies() == [(prefix.block_table[1], member.block_table[1])]
    bm.free(prefix)
    assert bm.ref_counts[member.block_table[0]] == 1
    bm.free(member)
    assert bm.num_free_blocks == 8


def test_block_manager_lru_cache_hits_and_evicts_least_recent() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, prefix_cache=True)
    a = _seq([1, 2, 3, 4, 5])
    bm.grow(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    assert bm.cached_prefix(_seq([1, 2, 3, 4, 9])) == a.block_table[:2]
    assert bm.cached_prefix(_seq([1, 2, 3, 4])) == a.block_table[:1]  # the last token is always computed
    assert bm.cached_prefix(_seq([1, 7, 3, 4, 5])) == []
    a_blocks = list(a.block_table)
    bm.free(a)  # freed blocks keep their content until reused
    assert bm.cached_prefix(_seq([1, 2, 3, 4, 9])) == a_blocks[:2]
    b = _seq([8, 8, 8, 8, 8, 8])
    # takes 3 of 4 free blocks: the never-used one, then a's blocks tail first (freed in reverse,
    # so a prefix's head, the part most likely shared, is evicted last)
    bm.grow(b, 6)
    assert bm.cached_prefix(_seq([1, 2, 3, 4, 9])) == a_blocks[:1]


def test_lru_filling_a_block_hashes_only_that_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks are named by a hash chain kept on the sequence: filling block k hashes its block_size
    tokens, not the k blocks before it again; a recompute after preemption hashes nothing."""
    real_hash = block_manager.block_hash
    hashed: list[int] = []

    def counting_hash(parent: int, tokens: tuple[int, ...]) -> int:
        hashed.append(len(tokens))
        return real_hash(parent, tokens)

    monkeypatch.setattr(block_manager, "block_hash", counting_hash)
    bs = 4
    bm = BlockManager(num_blocks=64, block_size=bs, prefix_cache=True)
    seq = _seq(list(range(10, 20)))  # a 10-token prompt, then one decoded token per step
    bm.grow(seq, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.register_full_blocks(seq)
    assert hashed == [bs, bs]
    for token in range(200):
        hashed.clear()
        seq.token_ids.append(token)
        bm.grow(seq, len(seq))
        seq.num_computed_tokens = len(seq)
        bm.register_full_blocks(seq)
        assert hashed == ([bs] if len(seq) % bs == 0 else []), len(seq)
    chain, parent = [], 0
    for i in range(len(seq) // bs):
        parent = real_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
        chain.append(parent)
    assert seq.block_hashes == chain
    blocks = list(seq.block_table)
    bm.free(seq)
    seq.reset_for_recompute()
    hashed.clear()
    assert bm.cached_prefix(seq) == blocks[: (len(seq) - 1) // bs]
    assert hashed == []
    assert bm.cached_prefix(_seq(seq.token_ids + [1])) == blocks[: len(seq) // bs]


def test_without_the_lru_cache_the_most_recently_freed_blocks_are_reused() -> None:
    """plan and none reuse the blocks they just freed, so a long run touches only as many KV blocks as
    it held at once (untouched pages of a CPU KV cache cost no RAM); lru keeps reusing the least recently
    freed, whose cached content is the least likely to be hit."""
    used: dict[bool, set[int]] = {}
    for prefix_cache in (False, True):
        bm = BlockManager(num_blocks=64, block_size=4, prefix_cache=prefix_cache)
        seen: set[int] = set()
        for i in range(40):
            seq = _seq(list(range(100 * i, 100 * i + 10)))  # 3 blocks at a time
            bm.grow(seq, 10)
            seen.update(seq.block_table)
            bm.free(seq)
        used[prefix_cache] = seen
        assert bm.num_free_blocks == 64
    assert used[False] == {0, 1, 2}
    assert len(used[True]) == 64
