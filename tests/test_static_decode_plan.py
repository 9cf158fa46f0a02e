"""CUDA-graph decode plans: one set of fixed buffers, loaded step after step with plans of other
shapes, gives what each step's own plan gives (the padding the tail becomes is inert), and a plan
that outgrows the buffers is refused, not truncated."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels.shared_prefix_decode import build_shared_prefix_batch, plan_shared_prefix_decode, shared_prefix_decode
from kernels.static_decode_plan import DecodePlanCapacity, StaticDecodePlan

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4
PLAN_KW = dict(block_m=32, kv_split=16)

# Step after step: many tiles and merges, then fewer (stale tiles and merge rows must go inert),
# then no group at all, then a group of one row with an empty suffix.
STEPS = [
    ([(37, [3, 0, 5, 19, 1]), (8, [0, 0])], [1, 9, 45]),
    ([(11, [2, 2])], [3]),
    ([], [50, 2]),
    ([(20, [0, 6, 30])], []),
]


def _plan(sc):
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, sc.block_size, "cpu")
    return plan_shared_prefix_decode(batch, HEADS, KV_HEADS, **PLAN_KW)


def _capacity(plans, rows: int) -> DecodePlanCapacity:
    first = plans[0]
    return DecodePlanCapacity(
        rows=rows,
        groups=max(p.batch.num_groups for p in plans),
        tiles=max(p.num_tiles for p in plans) + 3,
        parts=max(p.num_parts for p in plans),
        table_width=max(max(p.batch.block_tables.shape[1], p.batch.prefix_block_tables.shape[1]) for p in plans),
        num_heads=HEADS, num_kv_heads=KV_HEADS, block_size=BLOCK, block_m_group=first.block_m_group,
        block_m_row=first.block_m_row, kv_split=first.kv_split,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_plan_replays_each_step_like_its_own_plan(dtype) -> None:
    scenarios = [make_decode_scenario(10 + i, groups, ungrouped, HEADS, KV_HEADS, HEAD_DIM, BLOCK, dtype)
                 for i, (groups, ungrouped) in enumerate(STEPS)]
    plans = [_plan(sc) for sc in scenarios]
    cap = _capacity(plans, rows=max(p.batch.num_rows for p in plans) + 2)
    static = StaticDecodePlan.allocate(cap, "cpu")
    for sc, plan in zip(scenarios, plans):
        assert cap.holds(plan)
        static.load(plan)
        want = shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=torch.full_like(sc.q, 5.0))
        got = shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, static.plan, sc.scale,
                                   out=torch.full_like(sc.q, 5.0))
        # same kernels on the same numbers: equal bit for bit, untouched rows included
        assert torch.equal(got, want)


def test_capacity_refuses_and_grows() -> None:
    small = make_decode_scenario(1, [(11, [2, 2])], [3], HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    big = make_decode_scenario(2, [(37, [3, 0, 5, 19, 1])], [45, 45], HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    p_small, p_big = _plan(small), _plan(big)
    cap = _capacity([p_small], rows=p_big.batch.num_rows)
    assert not cap.holds(p_big)
    grown = cap.grown_for(p_big)
    assert grown.holds(p_big) and grown.holds(p_small)
    assert grown.tiles & (grown.tiles - 1) == 0  # powers of two: few re-captures as contexts grow
    static = StaticDecodePlan.allocate(cap, "cpu")
    with pytest.raises(AssertionError):
        static.load(p_big)
    other_split = plan_shared_prefix_decode(p_small.batch, HEADS, KV_HEADS, block_m=32, kv_split=32)
    assert not cap.holds(other_split)  # another kernel variant: a graph cannot replay it
