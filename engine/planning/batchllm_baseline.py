"""BatchLLM's single-level plan, simulated for `analyze`'s comparison (`run` never executes it).

`batchllm_groups` follows the reference implementation (microsoft/MixLLM
`PromptPrefixCluster._enlarge_1st_prefix_tokens` + `LLM._conv_CSGroup2Sequences`): bottom-up, a
grandchild G of node X (under child C) is lifted to be X's child, with C's tokens prepended, when
(L-1)*len(G) - len(C) > 0 (L = rows under G); C left with one child merges with it. Each root child
is a group; its prefix is cut to whole KV blocks and the tail recomputed by every member; groups of
one row or with a prefix shorter than a block run as plain requests. Our plan (execution_plan.py)
instead computes every trie node once, so it never pays the recomputation this rule weighs.

Everything here works in sorted positions (see sort.py); the caller maps them to rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.planning.trie import PrefixTrie


@dataclass(frozen=True)
class GroupTable:
    """BatchLLM's g groups over n rows, in sorted order.

    prefix_len: tokens every member shares (the depth of `node`); 0 for a plain row.
    shared_len: the whole-KV-block part of prefix_len: the prefix computed once; 0 for a plain row.
    node: trie node whose prefix the group shares (-1 for a plain row).
    row_offsets (g+1,), rows (n,): members of group k are rows[row_offsets[k]:row_offsets[k+1]];
        `rows` holds sorted positions or row indices depending on who built the table.
    """

    prefix_len: np.ndarray
    shared_len: np.ndarray
    node: np.ndarray
    row_offsets: np.ndarray
    rows: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.prefix_len)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def members(self, k: int) -> np.ndarray:
        return self.rows[self.row_offsets[k] : self.row_offsets[k + 1]]

    def map_rows(self, mapping: np.ndarray) -> "GroupTable":
        """The same groups with rows replaced by mapping[rows] (e.g. sorted position -> row index)."""
        return GroupTable(self.prefix_len, self.shared_len, self.node, self.row_offsets, mapping[self.rows])


def _table_from_labels(
    label_of_pos: np.ndarray,
    sequence: np.ndarray,
    node_of_label: np.ndarray,
    prefix_of_label: np.ndarray,
    block_size: int,
) -> GroupTable:
    """Groups from a label per sorted position (-1 = plain row), listed in the order their first
    member appears in `sequence` (a permutation of sorted positions), members in that order."""
    labels = label_of_pos[sequence]
    n = len(sequence)
    # A plain row is its own group: give it a unique negative label so it never merges with others.
    uniq_label = np.where(labels >= 0, labels, -1 - np.arange(n, dtype=np.int64))
    _, first_idx, inverse = np.unique(uniq_label, return_index=True, return_inverse=True)
    rank = np.empty(len(first_idx), dtype=np.int64)
    rank[np.argsort(first_idx, kind="stable")] = np.arange(len(first_idx), dtype=np.int64)
    group_of = rank[inverse]
    perm = np.argsort(group_of, kind="stable")  # members of a group keep their `sequence` order
    sizes = np.bincount(group_of, minlength=len(first_idx))
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    head_label = labels[perm[offsets[:-1]]]
    shared = head_label >= 0
    node = np.where(shared, node_of_label[np.maximum(head_label, 0)], -1)
    prefix = np.where(shared, prefix_of_label[np.maximum(head_label, 0)], 0)
    return GroupTable(
        prefix_len=prefix.astype(np.int64),
        shared_len=(prefix // block_size * block_size).astype(np.int64),
        node=node.astype(np.int64),
        row_offsets=offsets,
        rows=sequence[perm].astype(np.int64),
    )


def _children_lists(trie: PrefixTrie, heavy: np.ndarray) -> tuple[dict[int, list[int]], np.ndarray]:
    """Heavy (>= 2 rows) children of every node as Python lists, and per-node single-row-leaf counts.
    Single-row leaves can never be lifted or grouped on their own, so they are only counted."""
    parent = trie.parent
    light = np.bincount(parent[1:][~heavy[1:]], minlength=trie.num_nodes).astype(np.int64)
    hc: dict[int, list[int]] = {}
    ids = np.nonzero(heavy)[0]
    ids = ids[ids > 0]
    for v, p in zip(ids.tolist(), parent[ids].tolist()):
        hc.setdefault(p, []).append(v)
    return hc, light


def _resolve_top(up: np.ndarray, is_top: np.ndarray) -> np.ndarray:
    """For every node, the nearest node at or above it (following `up`) with is_top, else -1."""
    jump = np.where(is_top, np.arange(len(up), dtype=np.int64), up)
    # Pointer doubling: a top node points at itself, so O(log depth) vectorized rounds.
    while True:
        ok = jump >= 0
        need = ok & ~is_top[np.where(ok, jump, 0)]
        if not need.any():
            return jump
        jump[need] = jump[jump[need]]


@dataclass(frozen=True)
class BatchLLMPlan:
    groups: GroupTable  # rows = sorted positions
    prefill_tokens: int


def batchllm_groups(trie: PrefixTrie, lengths_sorted: np.ndarray, block_size: int) -> BatchLLMPlan:
    """BatchLLM's single-level groups and the prefill tokens they cost (see the module docstring).

    A member whose whole prompt is the block-aligned prefix still computes its last token (the
    reference's prefix request is prefill-only and does not sample), so members cost
    max(len - shared, 1); plain rows cost their length.
    """
    m = trie.num_nodes
    rows = trie.rows.tolist()
    elen = trie.span.tolist()
    ends = trie.ends.tolist()
    cur_parent = trie.parent.tolist()
    end_node = list(range(m))
    alias = [-1] * m
    heavy = trie.rows >= 2
    hc, light_arr = _children_lists(trie, heavy)
    light = light_arr.tolist()
    # Reverse pre-order visits every node after all its descendants: the reference's post-order.
    for c in np.nonzero(heavy)[0][::-1].tolist():
        if c == 0:
            continue
        x = cur_parent[c]
        len_c = elen[c]
        snapshot = hc.get(c, [])
        remaining = len(snapshot)
        kept: list[int] = []
        for i, g in enumerate(snapshot):
            if (rows[g] - 1) * elen[g] - len_c > 0:
                elen[g] += len_c
                cur_parent[g] = x
                hc.setdefault(x, []).append(g)
                rows[c] -= rows[g]
                remaining -= 1
            else:
                kept.append(g)
            if remaining + light[c] + ends[c] == 1:
                rest = kept + snapshot[i + 1 :]
                if rest:  # the one child left is a node: C absorbs it (C's tokens + its tokens)
                    k = rest[0]
                    elen[c] += elen[k]
                    kept = hc.get(k, [])
                    for gg in kept:
                        cur_parent[gg] = c
                    light[c] = light[k]
                    ends[c] = ends[k]
                    end_node[c] = end_node[k]
                    alias[k] = c
                    hc.pop(k, None)
                # else: the one left is a row ending at C or a single-row leaf; nothing to merge
                # (the reference would concatenate a leaf marker here and fail).
                break
        hc[c] = kept

    cur = np.asarray(cur_parent, dtype=np.int64)
    alias_arr = np.asarray(alias, dtype=np.int64)
    dead = alias_arr >= 0
    up = np.where(dead, alias_arr, cur)
    up[0] = -1
    is_top = ~dead & (cur == 0)
    is_top[0] = False
    top = _resolve_top(up, is_top)

    end_of_pos = trie.end_node_of_sorted()
    label = top[end_of_pos]  # root child (group) of every sorted position; -1 for empty rows
    rows_arr = np.asarray(rows, dtype=np.int64)
    plen = trie.depth_end[np.asarray(end_node, dtype=np.int64)]  # path length of each (top) node
    eligible = (rows_arr >= 2) & (plen >= block_size)
    label = np.where((label >= 0) & eligible[np.maximum(label, 0)], label, -1)

    lengths_sorted = np.asarray(lengths_sorted, dtype=np.int64)
    shared_of_pos = np.where(label >= 0, plen[np.maximum(label, 0)] // block_size * block_size, 0)
    member_cost = np.where(label >= 0, np.maximum(lengths_sorted - shared_of_pos, 1), lengths_sorted)
    used = np.unique(label[label >= 0])
    prefill = int(member_cost.sum()) + int((plen[used] // block_size * block_size).sum())
    node_of_label = np.asarray(end_node, dtype=np.int64)
    table = _table_from_labels(label, np.arange(len(label), dtype=np.int64), node_of_label, plen, block_size)
    return BatchLLMPlan(groups=table, prefill_tokens=prefill)
