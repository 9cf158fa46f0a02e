"""The batched PyTorch shared-prefix decode (the CPU path) equals the reference it replaces:
random cases (GQA ratios 1-8, groups of 1 to 64, empty suffixes, prefixes of 0 and of partial
blocks, rows without a group), groups of very different sizes that fall into several padding
buckets, and rows of q outside the batch left untouched."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch
from test_shared_prefix_attention import _random_case


@pytest.fixture(autouse=True)
def pytorch_decode(monkeypatch):
    """These tests are about the PyTorch path, which machines without the compiled decode attention
    (kernels/cpu_decode.py, tested in test_cpu_decode.py) run: keep it from taking the decode rows."""
    from kernels import cpu_library
    monkeypatch.setattr(cpu_library, "native_library", lambda: None)


def _check(sc, min_group_size: int = 2) -> int:
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, sc.block_size, "cpu", min_group_size=min_group_size)
    plan = plan_shared_prefix_torch(batch)
    out = torch.full_like(sc.q, 5.0)
    shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out)
    rows = torch.tensor(sc.query_rows, dtype=torch.int64)
    others = torch.ones(sc.q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 5.0).all(), "rows that are not decode rows must be left untouched"
    ref = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale)
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[rows], sc.expected()[rows], atol=1e-5, rtol=1e-5)
    return len(plan.buckets)


@pytest.mark.parametrize("seed", range(30))
def test_random_cases_equal_reference(seed: int) -> None:
    case = _random_case(seed)
    sc = make_decode_scenario(seed, **case)
    _check(sc)
    _check(sc, min_group_size=1)  # groups of one through the batched prefix part too


@pytest.mark.parametrize("heads,kv_heads,block_size", [(4, 4, 8), (8, 2, 4), (8, 1, 16), (6, 2, 5)])
def test_groups_of_very_different_sizes_use_several_buckets(heads: int, kv_heads: int, block_size: int) -> None:
    groups = [
        (300, [0, 3, 1]),  # one long prefix
        (7, [2] * 40),  # one large group on a short partial-block prefix
        (2 * block_size, [0, 0]),  # every suffix empty
        (2 * block_size + 1, [5, 1, 9]),  # about as long as the one before: the same bucket
        (33, [4]),  # a group of one (demoted unless min_group_size is 1)
    ]
    sc = make_decode_scenario(heads * 7 + block_size, groups, [1, 17], heads, kv_heads, 16, block_size)
    assert _check(sc) >= 2
    _check(sc, min_group_size=1)


def test_no_rows_and_no_suffix() -> None:
    sc = make_decode_scenario(3, [(24, [0, 0, 0])], [], 4, 2, 8, 8)  # prefix = whole context of every row
    _check(sc)
    empty = build_shared_prefix_batch([], [], [], [], [], 8, "cpu")
    q = torch.randn(2, 4, 8)
    out = shared_prefix_decode_torch(q, sc.k_cache, sc.v_cache, plan_shared_prefix_torch(empty), sc.scale,
                                     out=q.clone())
    assert torch.equal(out, q)


@pytest.mark.parametrize("window", [None, 5, 30])
@pytest.mark.parametrize("chunk_keys", [1, 20, 60])
def test_suffix_part_in_chunks_equals_the_definition(monkeypatch, window: int | None, chunk_keys: int) -> None:
    """Rows of very different suffix lengths (0 to 90 tokens, NaN in every unwritten slot) split over
    several chunks of the suffix part, longest first, each padded to its own longest: the same output
    as the definition, in q's rows, with and without a window; rows outside the batch untouched."""
    import kernels.paged_attention_torch as paged_torch
    from test_sliding_window import dense_decode

    heads, kv_heads, head_dim, bs = 4, 2, 16, 4
    groups = [(20, [3, 0, 90, 1, 17]), (9, [40, 2]), (12, [5, 61, 0])]
    sc = make_decode_scenario(7, groups, [1, 33, 70], heads, kv_heads, head_dim, bs)
    key_bytes = 2 * kv_heads * head_dim * 4
    monkeypatch.setattr(paged_torch, "DECODE_CHUNK_BYTES", chunk_keys * key_bytes)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, bs, "cpu")
    plan = plan_shared_prefix_torch(batch, window, heads_per_kv=heads // kv_heads)
    chunks = plan.suffix_chunks(key_bytes)
    assert len(chunks) > 1
    assert sorted(torch.cat([c.query_index for c in chunks]).tolist()) == sorted(sc.query_rows)
    out = torch.full_like(sc.q, 5.0)
    shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out, window=window)
    rows = torch.tensor(sc.query_rows)
    others = torch.ones(sc.q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 5.0).all()
    torch.testing.assert_close(out[rows], dense_decode(sc, window).float()[rows], atol=1e-5, rtol=1e-5)
