"""The execution plan `run` follows: every row once, parents before dependents, each shared token
computed once (rows ending at a shared node reuse its logits), decode groups as the runner forms them."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from engine.planning import PackedSequences, decode_groups, plan_execution

rows_strategy = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=40)


def build_plan(rows: list[list[int]], max_tokens: list[int]):
    return plan_execution(PackedSequences.from_lists(rows), np.array(max_tokens))


def naive_trie_tokens(rows: list[list[int]]) -> int:
    nodes: set[tuple[int, ...]] = set()
    for row in rows:
        nodes.update(tuple(row[: i + 1]) for i in range(len(row)))
    return len(nodes)


def items(plan) -> list[tuple[bool, int, int, int]]:
    """(is prefix, index, start prefix, start length) per item, in run order."""
    out = []
    for is_prefix, index in zip(plan.item_is_prefix.tolist(), plan.item_index.tolist()):
        if is_prefix:
            start, start_len = int(plan.prefix_parent[index]), int(plan.prefix_start_len[index])
        else:
            start, start_len = int(plan.row_start_prefix[index]), int(plan.row_start_len[index])
        out.append((is_prefix, index, start, start_len))
    return out


def plan_prefill(rows: list[list[int]], plan) -> int:
    total = 0
    for is_prefix, index, _, start_len in items(plan):
        length = int(plan.prefix_length[index]) if is_prefix else len(rows[index])
        total += length - start_len
    return total


@settings(max_examples=300, deadline=None)
@given(rows_strategy, st.data())
def test_plan_is_complete_ordered_and_minimal(rows: list[list[int]], data) -> None:
    max_tokens = data.draw(st.lists(st.integers(1, 50), min_size=len(rows), max_size=len(rows)))
    plan = build_plan(rows, max_tokens)
    assert plan.unique_prompt_tokens == naive_trie_tokens(rows)
    row_items = [index for is_prefix, index, _, _ in items(plan) if not is_prefix]
    assert sorted(row_items) == list(range(len(rows)))
    # a prefix is shared: at least two rows begin with it
    for length, source in zip(plan.prefix_length.tolist(), plan.prefix_source_row.tolist()):
        assert sum(r[:length] == rows[source][:length] and len(r) >= length for r in rows) >= 2
    seen_prefixes: set[int] = set()
    dependents = [0] * plan.num_prefixes
    for is_prefix, index, start, start_len in items(plan):
        tokens = rows[plan.prefix_source_row[index]] if is_prefix else rows[index]
        if start >= 0:
            assert start in seen_prefixes, "a dependent comes before its prefix"
            dependents[start] += 1
            assert start_len == plan.prefix_length[start]
            assert tokens[:start_len] == rows[plan.prefix_source_row[start]][:start_len], (
                "a dependent does not begin with its prefix's tokens"
            )
        else:
            assert start_len == 0
        if is_prefix:
            seen_prefixes.add(index)
        elif start_len == len(rows[index]):
            assert plan.prefix_keeps_logits[start], "a row that computes nothing needs logits"
    assert dependents == plan.prefix_dependents.tolist()
    assert plan_prefill(rows, plan) == plan.prefill_tokens == plan.unique_prompt_tokens


def test_decode_heavy_sibling_group_runs_first() -> None:
    shared = [9, 9, 9, 9]
    light = [shared + [1, 1, 1, 1, 1, 1, 1, 1, 1, x] for x in (5, 6)]
    heavy = [shared + [2, x] for x in (5, 6)]
    rows = light + heavy
    order = build_plan(rows, [4, 4, 400, 400]).row_order.tolist()
    assert order.index(2) < order.index(0) and order.index(3) < order.index(1)


def test_duplicates_share_everything_including_the_last_logits() -> None:
    rows = [[1, 2, 3, 4, 5]] * 4
    plan = build_plan(rows, [8] * 4)
    assert plan.prefix_length.tolist() == [5] and plan.prefix_keeps_logits.tolist() == [True]
    assert plan.row_start_len.tolist() == [5] * 4
    assert plan_prefill(rows, plan) == 5


def run_groups(rows: list[list[int]], plan, block: int) -> dict[tuple[int, tuple[int, ...]], list[int]]:
    """What the model runner does, by hand: a prefix's KV blocks are the parent's whole blocks plus
    its own new ones, a row holds its start prefix's whole blocks, and rows holding the same block
    at the same index (there: `_group_key`) decode as one group."""
    blocks: dict[int, list[tuple]] = {}
    for is_prefix, index, start, _ in items(plan):
        if not is_prefix:
            continue
        length = int(plan.prefix_length[index])
        inherited = blocks[start][: int(plan.prefix_length[start]) // block] if start >= 0 else []
        own = [("block", index, k) for k in range(len(inherited), length // block)]
        blocks[index] = inherited + own
    groups: dict[tuple, list[int]] = {}
    for row in range(len(rows)):
        start = int(plan.row_start_prefix[row])
        held = blocks[start][: int(plan.row_start_len[row]) // block] if start >= 0 else []
        if held:
            groups.setdefault((len(held), held[-1]), []).append(row)
    return {k: v for k, v in groups.items() if len(v) >= 2}


@settings(max_examples=200, deadline=None)
@given(rows_strategy, st.integers(1, 4))
def test_decode_groups_are_the_runners_groups(rows: list[list[int]], block: int) -> None:
    plan = build_plan(rows, [10] * len(rows))
    groups = decode_groups(plan, block)
    want = sorted((blocks * block, sorted(members)) for (blocks, _), members in run_groups(rows, plan, block).items())
    got = sorted((int(groups.shared_len[k]), sorted(groups.members(k).tolist())) for k in range(groups.num_groups))
    assert got == want
    assert groups.plain_rows == len(rows) - sum(len(m) for _, m in got)
    # groups are listed in the order their first member runs
    where = {row: i for i, row in enumerate(plan.row_order.tolist())}
    firsts = [min(where[r] for r in groups.members(k).tolist()) for k in range(groups.num_groups)]
    assert firsts == sorted(firsts)
