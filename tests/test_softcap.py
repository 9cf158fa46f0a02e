"""Attention logit soft-capping (Gemma 2: scaled scores -> softcap * tanh(score / softcap) before the
softmax) in every PyTorch attention path equals the definition (`kernel_cases.dense_attention`, float64),
with and without sliding windows, GQA ratios 1-4; the Triton backend, which does not cap, refuses it."""
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


def test_triton_backend_refuses_softcap() -> None:
    """Its kernels do not cap: a soft-capped call fails rather than computing uncapped attention."""
    heads, kv_heads, bs = 4, 2, 8
    sc = make_prefill_scenario(3, [(5, 5), (1, 9)], heads, kv_heads, 16, bs)
    backend = select_backend("triton", "cpu")  # the interpreter (tests/conftest.py sets TRITON_INTERPRET)
    meta = backend.build_step_metadata(sc.query_lens, sc.context_lens, sc.block_tables, bs, "cpu",
                                       num_heads=heads, num_kv_heads=kv_heads)
    with pytest.raises(ValueError, match="does not soft-cap"):
        backend.attention(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale, softcap=SOFTCAP)
