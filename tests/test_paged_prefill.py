"""Triton paged varlen attention (interpreter on CPU) equals `paged_attention_reference`."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import make_prefill_scenario
from kernels.paged_prefill import build_paged_prefill_metadata, paged_prefill

# (query_len, context_len): decode rows, a whole prompt, chunks starting and ending mid-block,
# a chunk spanning several blocks, a one-token context.
SPANS = [(1, 1), (1, 23), (9, 9), (6, 21), (19, 40), (3, 8)]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _run(sc, num_heads: int, num_kv_heads: int, **kw) -> torch.Tensor:
    meta = build_paged_prefill_metadata(
        sc.query_lens, sc.context_lens, sc.block_tables, sc.block_size, "cpu", num_heads, num_kv_heads, **kw
    )
    return paged_prefill(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale)


def _expected(sc) -> torch.Tensor:
    """The reference in float32 on the same (possibly float16) inputs."""
    q, k, v = sc.q, sc.k_cache, sc.v_cache
    sc.q, sc.k_cache, sc.v_cache = q.float(), k.float(), v.float()
    try:
        return sc.expected()
    finally:
        sc.q, sc.k_cache, sc.v_cache = q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(2, 2, 16, 8), (4, 2, 32, 16), (8, 2, 16, 4), (8, 1, 80, 8), (6, 2, 16, 7)],  # ratios 1, 2, 4, 8, 3
)
def test_paged_prefill_matches_reference(dtype, heads, kv_heads, head_dim, block_size) -> None:
    sc = make_prefill_scenario(heads * 7 + head_dim, SPANS, heads, kv_heads, head_dim, block_size, dtype)
    out = _run(sc, heads, kv_heads)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), _expected(sc), **TOL[dtype])


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_paged_prefill_model_head_dims(head_dim: int) -> None:
    sc = make_prefill_scenario(head_dim, [(1, 13), (5, 18)], 4, 1, head_dim, 16, torch.float16)
    torch.testing.assert_close(_run(sc, 4, 1).float(), _expected(sc), **TOL[torch.float16])


def test_paged_prefill_wide_tiles_and_subsets() -> None:
    # 8 heads per KV head x 37 queries = 296 rows: several wide tiles of 32 rows per sequence
    sc = make_prefill_scenario(5, [(37, 50), (1, 30), (12, 12)], 8, 1, 16, 16)
    torch.testing.assert_close(_run(sc, 8, 1, block_m=32), sc.expected(), atol=1e-5, rtol=1e-5)
    # only the last two sequences, found by their query starts; other rows are left as they were
    meta = build_paged_prefill_metadata(sc.query_lens[1:], sc.context_lens[1:], sc.block_tables[1:], 16, "cpu",
                                        8, 1, query_starts=[37, 38])
    out = torch.full_like(sc.q, 7.0)
    paged_prefill(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale, out=out)
    assert (out[:37] == 7.0).all()
    torch.testing.assert_close(out[37:], sc.expected()[37:], atol=1e-5, rtol=1e-5)


def test_paged_prefill_checks() -> None:
    sc = make_prefill_scenario(1, [(2, 5)], 4, 2, 16, 4)
    meta = build_paged_prefill_metadata([2], [5], sc.block_tables, 4, "cpu", 4, 2)
    with pytest.raises(ValueError, match="head counts"):
        paged_prefill(sc.q[:, :2], sc.k_cache, sc.v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill(sc.q[:, :3], sc.k_cache, sc.v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="bad span"):
        build_paged_prefill_metadata([3], [2], sc.block_tables, 4, "cpu", 4, 2)
    with pytest.raises(ValueError, match="beyond"):
        paged_prefill(sc.q[:1], sc.k_cache, sc.v_cache, meta, 1.0)
    empty = build_paged_prefill_metadata([], [], [], 4, "cpu", 4, 2)
    assert paged_prefill(sc.q, sc.k_cache, sc.v_cache, empty, 1.0).shape == sc.q.shape
