"""Triton shared-prefix decode attention (interpreter on CPU) equals plain paged attention and the
PyTorch reference: GQA ratios 1/2/4/8, groups of 1 and 64, empty suffixes, prefixes of 0 and of
partial blocks, prefixes and suffixes split over several tiles, rows without a group."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels.shared_prefix_decode import (
    build_shared_prefix_batch,
    plan_shared_prefix_decode,
    shared_prefix_decode,
    shared_prefix_decode_reference,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _check(sc, heads: int, kv_heads: int, dtype: torch.dtype, fused: bool = True, **plan_kw) -> None:
    batch = build_shared_prefix_batch(
        sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens, sc.block_size, "cpu"
    )
    plan = plan_shared_prefix_decode(batch, heads, kv_heads, **plan_kw)
    out = torch.full_like(sc.q, 5.0)
    shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out, fused=fused)
    rows = torch.tensor(sc.query_rows)
    others = torch.ones(sc.q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 5.0).all(), "rows that are not decode rows must be left untouched"
    ref = shared_prefix_decode_reference(sc.q.float(), sc.k_cache.float(), sc.v_cache.float(), batch, sc.scale)
    torch.testing.assert_close(out[rows].float(), ref[rows], **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(out[rows], sc.expected()[rows], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(2, 2, 16, 8), (4, 2, 32, 4), (8, 2, 16, 16), (8, 1, 80, 8), (6, 2, 16, 5)],  # ratios 1, 2, 4, 8, 3
)
def test_mixed_groups(dtype, heads, kv_heads, head_dim, block_size) -> None:
    groups = [
        (37, [3, 0, 5, 19, 1]),  # partial last prefix block, one empty suffix, a long suffix
        (2 * block_size, [0, 0]),  # whole-block prefix, every suffix empty
        (11, [4]),  # a group of one
    ]
    sc = make_decode_scenario(heads + head_dim, groups, [1, 9, 45], heads, kv_heads, head_dim, block_size, dtype)
    _check(sc, heads, kv_heads, dtype, kv_split=16)  # prefix and long rows split over several tiles
    _check(sc, heads, kv_heads, dtype, kv_split=64, block_m=32, fused=False)  # one tile per part, 2 launches


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 1)])
def test_group_of_64(heads: int, kv_heads: int) -> None:
    suffixes = [(i * 7) % 13 for i in range(64)]  # includes empty suffixes
    sc = make_decode_scenario(64, [(29, suffixes)], [], heads, kv_heads, 16, 8)
    _check(sc, heads, kv_heads, torch.float32, kv_split=32)


def test_direct_output_paths() -> None:
    # every row is a single part: a group with one prefix tile and empty suffixes, plain short rows
    sc = make_decode_scenario(3, [(12, [0, 0, 0])], [5, 7], 4, 2, 16, 4)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, 4, "cpu")
    plan = plan_shared_prefix_decode(batch, 4, 2, kv_split=64)
    assert plan.num_parts == 0 and plan.merge_rows.numel() == 0 and (plan.tile_part == -1).all()
    _check(sc, 4, 2, torch.float32, kv_split=64)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_model_head_dims(head_dim: int) -> None:
    sc = make_decode_scenario(head_dim, [(21, [2, 0, 6])], [10], 4, 1, head_dim, 16, torch.float16)
    _check(sc, 4, 1, torch.float16, kv_split=16)


def test_plan_shape() -> None:
    sc = make_decode_scenario(0, [(40, [3, 0, 20]), (9, [1, 1])], [50], 8, 2, 16, 8)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, 8, "cpu")
    plan = plan_shared_prefix_decode(batch, 8, 2, block_m=16, kv_split=16)
    # group 0: 3 members x 4 heads = 12 rows -> 1 row tile x 3 prefix splits; group 1: 1 x 1
    assert plan.num_group_tiles == 4
    # request tiles: suffixes 3, 20 (2 splits), 1, 1 and the plain row of 50 (4 splits)
    assert plan.num_tiles - plan.num_group_tiles == 1 + 2 + 1 + 1 + 4
    assert sorted(plan.row_num_parts.tolist()) == [2, 2, 3, 4, 4, 5]
    with pytest.raises(ValueError, match="multiple"):
        plan_shared_prefix_decode(batch, 6, 4)
    with pytest.raises(ValueError, match="head counts"):
        shared_prefix_decode(sc.q[:, :4], sc.k_cache, sc.v_cache, plan, 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases(seed: int) -> None:
    from test_shared_prefix_attention import _random_case

    case = _random_case(seed) | {"head_dim": 16}
    case["groups"] = [(p, suffixes[:17]) for p, suffixes in case["groups"]]  # groups of 64: test above
    sc = make_decode_scenario(seed, **case)
    _check(sc, case["num_heads"], case["num_kv_heads"], torch.float32, kv_split=[16, 32, 48][seed % 3])


def _tiles_by_loops(batch, ratio: int, bm: int, split: int) -> dict:
    """The planner's tiles and parts written as plain loops, one row at a time: what the numpy
    planner must reproduce exactly, order included."""
    ctx, sstart = batch.host_context_lens, batch.host_suffix_starts
    starts, plens = batch.host_group_row_starts, batch.host_prefix_lens
    nsplit = lambda n: -(-n // split)  # noqa: E731
    n_pre = [0] * len(ctx)
    for g, p in enumerate(plens):
        for r in range(starts[g], starts[g + 1]):
            n_pre[r] = nsplit(p)
    n_suf = [nsplit(c - s) for c, s in zip(ctx, sstart)]
    n_parts = [a + b for a, b in zip(n_pre, n_suf)]
    direct = [nsplit(p) == 1 and all(n_suf[r] == 0 for r in range(starts[g], starts[g + 1]))
              for g, p in enumerate(plens)]
    merged = [n >= 2 for n in n_parts]
    for g, d in enumerate(direct):
        for r in range(starts[g], starts[g + 1]):
            merged[r] = not d
    part_start, total = [0] * len(ctx), 0
    for r in range(len(ctx)):
        if merged[r]:
            part_start[r], total = total, total + n_parts[r]
    group_tiles, row_tiles = [], []
    for g, p in enumerate(plens):
        for f0 in range(starts[g] * ratio, starts[g + 1] * ratio, bm):
            f1 = min(f0 + bm, starts[g + 1] * ratio)
            for s in range(nsplit(p)):
                lo, hi = s * split, min(p, (s + 1) * split)
                group_tiles.append((-(hi - lo) * (f1 - f0), f0, f1, g, lo, hi, -1 if direct[g] else s))
    for r in range(len(ctx)):
        for j in range(n_suf[r]):
            lo = sstart[r] + j * split
            hi = min(ctx[r], lo + split)
            row_tiles.append((-(hi - lo), r * ratio, (r + 1) * ratio, r, lo, hi, n_pre[r] + j if merged[r] else -1))
    tiles = sorted(group_tiles) + sorted(row_tiles)
    return dict(tiles=[t[1:] for t in tiles], part_start=part_start, n_parts=n_parts,
                merge_rows=[r for r in range(len(ctx)) if merged[r]], num_group_tiles=len(group_tiles), total=total)


@pytest.mark.parametrize("seed", range(30))
def test_planner_equals_row_by_row_loops(seed: int) -> None:
    from test_shared_prefix_attention import _random_case

    case = _random_case(seed)
    sc = make_decode_scenario(seed, **case)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, sc.block_size, "cpu")
    split, bm = [5, 16, 64][seed % 3], [16, 32][seed % 2]
    plan = plan_shared_prefix_decode(batch, case["num_heads"], case["num_kv_heads"], block_m=bm, kv_split=split)
    want = _tiles_by_loops(batch, case["num_heads"] // case["num_kv_heads"], bm, split)
    cols = (plan.tile_f0, plan.tile_f1, plan.tile_table, plan.tile_kv_lo, plan.tile_kv_hi, plan.tile_part)
    assert list(zip(*(c.tolist() for c in cols))) == want["tiles"]
    assert plan.row_part_start.tolist() == want["part_start"] and plan.row_num_parts.tolist() == want["n_parts"]
    assert plan.merge_rows.tolist() == want["merge_rows"] and plan.num_parts == want["total"]
    assert plan.num_group_tiles == want["num_group_tiles"] == plan.group_tile_count.item()
