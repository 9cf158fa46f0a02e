"""The PyTorch paged attention CPU path equals `paged_attention_reference`: decode rows (NaN in
every unwritten slot), whole-prompt chunks read from the step's new keys, continuing chunks read
from the cache, GQA ratios 1-8, chunks placed at given rows of q."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import make_prefill_scenario
from kernels.paged_attention import build_paged_batch
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch


@pytest.fixture(autouse=True)
def pytorch_decode(monkeypatch):
    """These tests are about the PyTorch path, which machines without the compiled decode attention
    (kernels/cpu_decode.py, tested in test_cpu_decode.py) run: keep it from taking the decode rows."""
    from kernels import cpu_library
    monkeypatch.setattr(cpu_library, "native_library", lambda: None)

# (query_len, context_len): decode rows, whole prompts, chunks starting and ending mid-block,
# a one-token context
SPANS = [(1, 1), (1, 23), (9, 9), (6, 21), (19, 40), (3, 8), (30, 30), (1, 5)]


def _new_kv(sc) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of every query token, in q's row order (as a step stores them)."""
    bs, (kvh, d) = sc.block_size, sc.k_cache.shape[-2:]
    slots = []
    for ql, c, table in zip(sc.query_lens, sc.context_lens, sc.block_tables):
        slots += [table[p // bs] * bs + p % bs for p in range(c - ql, c)]
    idx = torch.tensor(slots)
    return sc.k_cache.view(-1, kvh, d)[idx].clone(), sc.v_cache.view(-1, kvh, d)[idx].clone()


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(2, 2, 16, 8), (4, 2, 32, 16), (8, 1, 16, 4), (6, 2, 8, 7)])
def test_equals_reference(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    sc = make_prefill_scenario(heads * 3 + block_size, SPANS, heads, kv_heads, head_dim, block_size)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, block_size, torch.device("cpu"))
    plan = plan_paged_torch(batch)
    expected = sc.expected()
    key, value = _new_kv(sc)
    for kv in ((None, None), (key, value)):
        out = paged_attention_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, torch.empty_like(sc.q), *kv)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_whole_prompt_chunks_use_the_new_keys() -> None:
    """A chunk that is its whole context attends to the given keys (the cache is not read for it)."""
    sc = make_prefill_scenario(1, [(9, 9), (4, 12)], 4, 2, 16, 4)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 4, torch.device("cpu"))
    key, value = _new_kv(sc)
    k_cache, v_cache = sc.k_cache.clone(), sc.v_cache.clone()
    k_cache[sc.block_tables[0]] = float("nan")  # the first chunk's blocks: poison if read
    v_cache[sc.block_tables[0]] = float("nan")
    out = paged_attention_torch(sc.q, k_cache, v_cache, plan_paged_torch(batch), sc.scale, torch.empty_like(sc.q),
                                key, value)
    torch.testing.assert_close(out, sc.expected(), atol=1e-5, rtol=1e-5)


def test_rows_outside_the_batch_are_untouched() -> None:
    sc = make_prefill_scenario(2, [(1, 13), (5, 18)], 8, 2, 16, 8)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 8, torch.device("cpu"))
    # the two chunks at rows 3 and 6..10 of a 12-row q
    q = torch.randn(12, 8, 16)
    q[3], q[6:11] = sc.q[0], sc.q[1:]
    moved = dataclasses.replace(batch, decode_query_index=torch.tensor([3]), prefill_spans=((6, 5, 18),))
    out = paged_attention_torch(q, sc.k_cache, sc.v_cache, plan_paged_torch(moved), sc.scale, torch.full_like(q, 7.0))
    keep = torch.ones(12, dtype=torch.bool)
    keep[3], keep[6:11] = False, False
    assert (out[keep] == 7.0).all()
    torch.testing.assert_close(out[[3, 6, 7, 8, 9, 10]], sc.expected(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("chunk_blocks", [1, 3, 7])
def test_decode_rows_in_chunks_equal_the_reference(monkeypatch, window: int | None, chunk_blocks: int) -> None:
    """Decode rows of very different context lengths split over several chunks (longest first, each
    padded to its own longest row; NaN in every unwritten slot) give the reference's output in q's
    row order, with and without a sliding window."""
    import kernels.paged_attention_torch as paged_torch
    from kernels.paged_attention import paged_attention_reference

    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    spans = [(1, 3), (1, 41), (5, 9), (1, 1), (1, 17), (1, 40), (1, 6), (7, 7), (1, 29), (1, 12)]
    sc = make_prefill_scenario(5, spans, heads, kv_heads, head_dim, block_size)
    block_bytes = 2 * block_size * kv_heads * head_dim * 4
    monkeypatch.setattr(paged_torch, "DECODE_CHUNK_BYTES", chunk_blocks * block_bytes)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, block_size, torch.device("cpu"),
                              window=window)
    plan = plan_paged_torch(batch)
    chunks = plan.decode_chunks(block_bytes)
    assert len(chunks) > 1
    assert sorted(torch.cat([c.query_index for c in chunks]).tolist()) == batch.decode_query_index.tolist()
    expected = paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=window)
    out = paged_attention_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, torch.empty_like(sc.q), window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_folded_gqa_decode_takes_any_output_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode attention folds a KV head's query heads into rows; CUDA's mem-efficient SDPA kernel hands
    its output back transposed in memory ([b, rows, heads, d] strides). Unfolding it with `view`
    raised on the H200 (every GQA model's decode on the torch backend there); the CPU kernel's
    contiguous output hid it. Here SDPA is made to return CUDA's layout."""
    import kernels.paged_attention as pa

    real = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.arange(40)[None, None, None, :] < torch.tensor([40, 17, 5])[:, None, None, None]
    want = pa.attend(q, k, v, mask, 0.25)
    monkeypatch.setattr(pa.F, "scaled_dot_product_attention",
                        lambda *a, **kw: real(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(pa.attend(q, k, v, mask, 0.25), want)


@pytest.mark.parametrize("variant,sharing", [("llama_gqa", "plan"), ("llama_gqa", "none"), ("mistral_window", "lru"),
                                             ("gemma2", "plan"), ("qwen3_moe", "none")])
def test_engine_on_cuda_shaped_attention_gives_the_same_tokens(tiny_model_dir, monkeypatch, variant: str,
                                                               sharing: str) -> None:
    """The torch backend's engine run with CUDA's attention routing emulated on CPU: SDPA outputs in
    CUDA's transposed layout and no private CPU flash kernel (CUDA takes the matmul form there). Any
    step that assumes the CPU kernels' memory layout fails here instead of on a GPU."""
    import kernels.shared_prefix_torch as spt
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from test_prefix_sharing import multi_level_prompts

    prompts, params = multi_level_prompts(), SamplingParams(max_tokens=6, ignore_eos=True)

    def tokens() -> dict:
        engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir(variant)), device="cpu", max_batch_tokens=64,
                                        kv_cache_tokens=4096, max_num_seqs=7, prefix_sharing=sharing))
        return {r.key: r.token_ids for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}

    want = tokens()
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: real(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    monkeypatch.setattr(spt, "_FLASH_CPU", None)
    assert tokens() == want
