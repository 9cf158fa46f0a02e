"""Attention logit soft-capping (Gemma 2: scaled scores -> softcap * tanh(score / softcap) before the
softmax) in every PyTorch attention path equals the definition (`kernel_cases.dense_attention`, float64),
with and without sliding windows, GQA ratios 1-4, and in the Triton kernels (interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import dense_decode, dense_prefill, make_decode_scenario, make_prefill_scenario
from kernels.attention_backend import select_backend
from kernels.paged_attention import build_paged_batch, paged_attention_reference
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch

TOL = dict(atol=1e-5, rtol=1e-5)
KERNEL_TOL = {torch.float32: TOL, torch.float16: dict(atol=3e-3, rtol=3e-3)}
SPANS = [(1, 1), (1, 23), (9, 9), (6, 21), (19, 40), (3, 8), (1, 50)]  # (query_len, context_len)
GROUPS = [(37, [3, 0, 5, 19, 1, 30]), (16, [0, 0]), (11, [4])]
UNGROUPED = [1, 9, 45]
SHAPES = [(4, 2, 16, 8), (6, 2, 8, 7), (4, 4, 16, 5), (8, 2, 16, 16)]  # heads, kv_heads, head_dim, block_size
SOFTCAP = 0.5  # below the scenarios' score magnitudes, so capping changes the result


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_paged_torch_paths_soft_cap(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    sc = make_prefill_scenario(heads + block_size, SPANS, heads, kv_heads, head_dim, block_size)
    for window in (None, 13):
        expected = dense_prefill(sc, window, SOFTCAP).float()
        assert not torch.allclose(expected, dense_prefill(sc, window).float(), **TOL), "the cap must matter"
        batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, block_size,
                                  torch.device("cpu"), window=window)
        ref = paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=window, softcap=SOFTCAP)
        torch.testing.assert_close(ref, expected, **TOL)
        out = paged_attention_torch(sc.q, sc.k_cache, sc.v_cache, plan_paged_torch(batch), sc.scale,
                                    torch.empty_like(sc.q), window=window, softcap=SOFTCAP)
        torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_shared_prefix_torch_paths_soft_cap(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    sc = make_decode_scenario(heads * 5 + block_size, GROUPS, UNGROUPED, heads, kv_heads, head_dim, block_size)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, block_size, "cpu")
    rows = torch.tensor(sc.query_rows)
    for window in (None, 13):
        expected = dense_decode(sc, window, SOFTCAP).float()[rows]
        assert not torch.allclose(expected, dense_decode(sc, window).float()[rows], **TOL), "the cap must matter"
        ref = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=window,
                                             softcap=SOFTCAP)
        torch.testing.assert_close(ref[rows], expected, **TOL)
        plan = plan_shared_prefix_torch(batch, window, heads_per_kv=heads // kv_heads)
        out = torch.full_like(sc.q, 5.0)
        shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out, window=window,
                                   softcap=SOFTCAP)
        torch.testing.assert_close(out[rows], expected, **TOL)


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size",
                         [(torch.float32, 4, 2, 16, 8), (torch.float16, 6, 2, 8, 7)])
def test_paged_prefill_kernel_soft_caps(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                        block_size: int) -> None:
    from kernels.paged_prefill import build_paged_prefill_metadata, paged_prefill

    sc = make_prefill_scenario(heads + block_size, SPANS, heads, kv_heads, head_dim, block_size, dtype)
    meta = build_paged_prefill_metadata(sc.query_lens, sc.context_lens, sc.block_tables, block_size, "cpu",
                                        heads, kv_heads)
    for window in (None, 13):
        out = paged_prefill(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window, softcap=SOFTCAP)
        torch.testing.assert_close(out.float(), dense_prefill(sc, window, SOFTCAP).float(), **KERNEL_TOL[dtype])


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size",
                         [(torch.float32, 4, 2, 16, 8), (torch.float16, 6, 2, 8, 5)])
def test_shared_prefix_decode_kernel_soft_caps(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                               block_size: int) -> None:
    from kernels.shared_prefix_decode import plan_shared_prefix_decode, shared_prefix_decode

    sc = make_decode_scenario(heads + head_dim, GROUPS, UNGROUPED, heads, kv_heads, head_dim, block_size, dtype)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, block_size, "cpu")
    rows = torch.tensor(sc.query_rows)
    # several tiles per prefix and per row (merged by the capped scores' LSE), fused and split launches
    plan = plan_shared_prefix_decode(batch, heads, kv_heads, kv_split=16)
    for fused, window in ((True, None), (False, 13)):
        out = shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, window=window, softcap=SOFTCAP,
                                   fused=fused)
        torch.testing.assert_close(out[rows].float(), dense_decode(sc, window, SOFTCAP).float()[rows],
                                   **KERNEL_TOL[dtype])


def test_backends_agree_on_a_soft_capped_step() -> None:
    """A step of prefill chunks and grouped decode rows through each backend's `attention`."""
    heads, kv_heads, bs = 4, 2, 8
    sc = make_decode_scenario(5, GROUPS, UNGROUPED, heads, kv_heads, 16, bs)
    n = len(sc.context_lens)
    outs = []
    for name in ("torch", "triton"):
        backend = select_backend(name, "cpu")  # triton: the interpreter (tests/conftest.py sets TRITON_INTERPRET)
        meta = backend.build_step_metadata([1] * n, sc.context_lens, sc.block_tables, bs, "cpu",
                                           num_heads=heads, num_kv_heads=kv_heads, group_ids=sc.group_ids,
                                           prefix_lens=sc.prefix_lens)
        q = sc.q[torch.tensor(sc.query_rows)]
        outs.append(backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale, softcap=SOFTCAP))
    torch.testing.assert_close(outs[1], outs[0], **TOL)
