"""The run-time prefix plan: every row once, parents before dependents, each shared token computed
once (at most nothing more: rows ending at a shared node reuse its logits)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from engine.execution_plan import build_plan

rows_strategy = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=40)


def naive_trie_tokens(rows: list[list[int]]) -> int:
    nodes: set[tuple[int, ...]] = set()
    for row in rows:
        nodes.update(tuple(row[: i + 1]) for i in range(len(row)))
    return len(nodes)


def plan_prefill(rows: list[list[int]], plan) -> int:
    prefix_len = {p.prefix_id: p.length for p in plan.prefixes}
    total = 0
    for item in plan.items:
        length = prefix_len[item.index] if item.is_prefix else len(rows[item.index])
        total += length - item.start_len
    return total


@settings(max_examples=300, deadline=None)
@given(rows_strategy, st.data())
def test_plan_is_complete_ordered_and_minimal(rows: list[list[int]], data) -> None:
    max_tokens = data.draw(st.lists(st.integers(1, 50), min_size=len(rows), max_size=len(rows)))
    plan = build_plan(rows, max_tokens)
    assert plan.unique_prompt_tokens == naive_trie_tokens(rows)
    row_items = [i.index for i in plan.items if not i.is_prefix]
    assert sorted(row_items) == list(range(len(rows)))
    seen_prefixes: set[int] = set()
    dependents = {p.prefix_id: 0 for p in plan.prefixes}
    for item in plan.items:
        if item.start_prefix >= 0:
            assert item.start_prefix in seen_prefixes, "a dependent comes before its prefix"
            dependents[item.start_prefix] += 1
            prefix = plan.prefixes[item.start_prefix]
            assert item.start_len <= prefix.length
            source = rows[prefix.source_row][: item.start_len]
            tokens = rows[item.index][: item.start_len] if not item.is_prefix else rows[plan.prefixes[item.index].source_row][: item.start_len]
            assert tokens == source, "a dependent does not begin with its prefix's tokens"
        else:
            assert item.start_len == 0
        if item.is_prefix:
            seen_prefixes.add(item.index)
        elif item.start_len == len(rows[item.index]):
            assert plan.prefixes[item.start_prefix].keeps_logits, "a row that computes nothing needs logits"
    assert dependents == {p.prefix_id: p.num_dependents for p in plan.prefixes}
    prefill = plan_prefill(rows, plan)
    assert prefill == plan.unique_prompt_tokens


def test_decode_heavy_sibling_group_runs_first() -> None:
    shared = [9, 9, 9, 9]
    light = [shared + [1, 1, 1, 1, 1, 1, 1, 1, 1, x] for x in (5, 6)]
    heavy = [shared + [2, x] for x in (5, 6)]
    rows = light + heavy
    plan = build_plan(rows, [4, 4, 400, 400])
    order = [i.index for i in plan.items if not i.is_prefix]
    assert order.index(2) < order.index(0) and order.index(3) < order.index(1)


def test_duplicates_share_everything_including_the_last_logits() -> None:
    rows = [[1, 2, 3, 4, 5]] * 4
    plan = build_plan(rows, [8] * 4)
    assert [(p.length, p.keeps_logits) for p in plan.prefixes] == [(5, True)]
    assert all(i.start_len == 5 for i in plan.items if not i.is_prefix)
    assert plan_prefill(rows, plan) == 5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=30), st.lists(st.integers(0, 2), max_size=30), st.integers(1, 7))
def test_lcp_over_windows_equals_naive(a: list[int], b: list[int], window: int) -> None:
    from engine.execution_plan import _lcp

    naive = 0
    while naive < min(len(a), len(b)) and a[naive] == b[naive]:
        naive += 1
    assert _lcp(a, b, window) == naive
    assert _lcp(a + [5] * 100, a + [5] * 99 + [6]) == len(a) + 99  # beyond the default window
