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


@pytest.mark.parametrize("window", [None, 3, 13, 40])
@pytest.mark.parametrize("heads,kv_heads,block_size", [(4, 2, 8), (6, 2, 5)])
def test_prefixes_in_consecutive_blocks_are_read_in_place(window: int | None, heads: int, kv_heads: int,
                                                          block_size: int) -> None:
    """A group whose full prefix blocks are consecutive gets a bucket of its own read as a slice of
    the cache (no gather; NaN in every unwritten slot around it); groups in scattered blocks still
    share padded buckets; decode and group prefill both equal the definition, with and without a window."""
    from kernels.attention_backend import TorchBackend
    from kernels.paged_attention import build_paged_batch, paged_attention_reference
    from test_sliding_window import dense_decode

    # whole-block prefixes in consecutive blocks (groups 0 and 3, as the engine's plans have them),
    # one in scattered blocks, one ending mid-block (its last block is each member's copy: not a run)
    groups = [(80, [3, 0, 5, 19]), (16, [0, 2]), (11, [4, 1]), (40, [2, 9, 1])]
    sc = make_decode_scenario(heads + block_size, groups, [1, 9], heads, kv_heads, 16, block_size,
                              contiguous_groups=(0, 2, 3))
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, sc.block_size, "cpu")
    plan = plan_shared_prefix_torch(batch, window, heads_per_kv=heads // kv_heads)
    if window is None:
        assert sum(b.run_start is not None for b in plan.buckets) == 2
        assert sum(b.num_groups for b in plan.buckets if b.run_start is None) == 2
    out = torch.full_like(sc.q, 5.0)
    shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out, window=window)
    rows = torch.tensor(sc.query_rows)
    torch.testing.assert_close(out[rows], dense_decode(sc, window).float()[rows], atol=1e-5, rtol=1e-5)

    # the members' prefill chunks after their prefix, through group prefill
    members = [i for i, gid in enumerate(sc.group_ids) if gid is not None and sc.context_lens[i] - sc.prefix_lens[i] > 1]
    qls = [sc.context_lens[i] - sc.prefix_lens[i] for i in members]
    ctxs, tables = [sc.context_lens[i] for i in members], [sc.block_tables[i] for i in members]
    backend = TorchBackend()
    meta = backend.build_step_metadata(qls, ctxs, tables, block_size, "cpu", num_heads=heads, num_kv_heads=kv_heads,
                                       group_ids=[sc.group_ids[i] for i in members],
                                       prefix_lens=[sc.prefix_lens[i] for i in members], window=window)
    assert meta.group_prefill is not None
    if window is None:
        assert any(b.run_start is not None for b in meta.group_prefill.buckets)
    q = torch.randn(sum(qls), heads, 16, generator=torch.Generator().manual_seed(1))
    got = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window)
    plain = build_paged_batch(qls, ctxs, tables, block_size, torch.device("cpu"))
    expected = paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale, window=window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
