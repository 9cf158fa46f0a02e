"""Flattening the prefix trie into groups ("one shared prefix + members"), two ways.

BatchLLM's single-level plan (`batchllm_groups`) follows the reference implementation
(microsoft/MixLLM `PromptPrefixCluster._enlarge_1st_prefix_tokens` + `LLM._conv_CSGroup2Sequences`):
bottom-up, a grandchild G of node X (under child C) is lifted to be X's child, with C's tokens
prepended, when (L-1)*len(G) - len(C) > 0 (L = rows under G); C left with one child merges with it.
Each root child is a group; its prefix is cut to whole KV blocks and the tail recomputed by every
member; groups of one row or with a prefix shorter than a block run as plain requests.

Our plan (`decode_groups`) computes every trie node once (a node's KV blocks extend its parent's,
the partial last block copied on write), so prefill is the same whatever the grouping; grouping only
decides which rows the decode kernel serves against one shared prefix. Per decode step a group of m
rows with w whole shared blocks reads that prefix once instead of m times, saving (m-1)*w*block_size
token reads. `decode_groups` maximizes the sum of that saving exactly, by a bottom-up DP, over
groupings of BatchLLM's shape: a group is a trie node's rows minus whole child subtrees (the node
takes the rows ending there, its single-row leaves, and every child subtree whose rows are worth more
in this group, rows * shared length, than in their own best grouping). The shape keeps every trie
subtree contiguous in the run order, so a node's KV blocks are pinned over one interval; the
unconstrained optimum can put a few rows of a subtree into an ancestor's group and the rest into
their own, splitting the subtree across groups for a small gain. BatchLLM's lifting rule itself
weighs sharing against recomputing C's tokens, a cost our plan never pays, so it is the wrong
trade-off here.

Everything here works in sorted positions (see prefix_sort); the caller maps them to rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.prefix_trie import PrefixTrie


@dataclass(frozen=True)
class GroupTable:
    """g groups over n rows, in the order they run.

    prefix_len: tokens every member shares (the depth of `node`); 0 for a plain row.
    shared_len: the whole-KV-block part of prefix_len the group shares (BatchLLM: the computed
        prefix; ours: what the decode kernel reads once); 0 for a plain row.
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


@dataclass(frozen=True)
class DecodeGroups:
    """Our plan's grouping. label_of_pos: group node per sorted position (-1 = plain row);
    group_at/absorbed per node (see `decode_groups`); saved_reads: sum over groups of
    (members - 1) * shared_len, the prefix-KV token reads a decode step saves."""

    label_of_pos: np.ndarray
    group_at: np.ndarray
    absorbed: np.ndarray
    saved_reads: int


def decode_groups(trie: PrefixTrie, block_size: int) -> DecodeGroups:
    """Groups of BatchLLM's shape maximizing sum (members - 1) * shared_len (module docstring).

    group_at[v]: a group is formed at node v (not inside an ancestor's group).
    absorbed[v]: v's whole subtree joins its parent's group (its parent forms one or is inside one).
    """
    m = trie.num_nodes
    aligned = (trie.depth_end // block_size * block_size).tolist()
    rows = trie.rows.tolist()
    ends = trie.ends.tolist()
    heavy = trie.rows >= 2
    hc, light_arr = _children_lists(trie, heavy)
    light = light_arr.tolist()
    best = [0] * m
    group_at = np.zeros(m, dtype=bool)
    absorbed = np.zeros(m, dtype=bool)
    for v in np.nonzero(heavy)[0][::-1].tolist():
        a = aligned[v]
        singles = ends[v] + light[v]
        kids = hc.get(v, [])
        base = 0
        take: list[int] = []
        gain = 0
        taken_rows = 0
        for c in kids:
            base += best[c]
            val = rows[c] * a - best[c]
            if val > 0:
                take.append(c)
                gain += val
                taken_rows += rows[c]
        alone = base + (singles - 1) * a if singles >= 2 else base
        with_kids = base + gain + (singles - 1) * a
        if take and singles + taken_rows >= 2 and with_kids > alone:
            best[v] = with_kids
            group_at[v] = True
            absorbed[take] = True
        else:
            best[v] = alone
            group_at[v] = singles >= 2 and a > 0
    group_at[0] = False  # the root shares no tokens

    # Top-down: rows of an absorbed subtree belong to the group that absorbed it.
    parent = trie.parent
    own = np.full(m, -1, dtype=np.int64)  # group of rows ending at the node (and its light leaves)
    sub = np.full(m, -1, dtype=np.int64)  # group forced on the node's whole subtree
    gat = group_at.tolist()
    for v, p in zip(np.nonzero(heavy)[0].tolist(), parent[heavy].tolist()):
        if v == 0:
            continue
        s = sub[p] if sub[p] >= 0 else (own[p] if absorbed[v] else -1)
        sub[v] = s
        if s >= 0:
            group_at[v] = False  # inside an ancestor's group: its own best grouping is not used
            own[v] = s
        else:
            own[v] = v if gat[v] else -1
    light_nodes = np.nonzero(~heavy)[0]
    light_nodes = light_nodes[light_nodes > 0]
    own[light_nodes] = own[parent[light_nodes]]
    absorbed[light_nodes] = own[light_nodes] >= 0
    label = own[trie.end_node_of_sorted()]
    return DecodeGroups(label_of_pos=label, group_at=group_at, absorbed=absorbed, saved_reads=int(best[0]))


def plan_order(trie: PrefixTrie, groups: DecodeGroups, max_tokens: int = 1) -> np.ndarray:
    """Sorted positions in the order the scheduler should run them.

    Trie DFS; a group is one unit (its rows consecutive). Among siblings the unit with the larger
    expected decode / prefill ratio (max_tokens * rows / unique tokens below the parent) goes first,
    so long decodes start early and overlap later units' prefill. Rows ending at a node need no
    further prefill (ratio infinite) and lead. Ties keep sorted order.
    """
    m = trie.num_nodes
    sub_tok = trie.subtree_tokens()
    # Ordering tree: trie nodes plus one virtual node per group, holding the rows ending at the
    # group node and the subtrees it absorbed.
    gnodes = np.nonzero(groups.group_at)[0]
    gid = np.full(m, -1, dtype=np.int64)
    gid[gnodes] = m + np.arange(len(gnodes), dtype=np.int64)
    parent = trie.parent.copy()
    moved = groups.absorbed & (gid[np.maximum(trie.parent, 0)] >= 0)
    moved[0] = False
    parent[moved] = gid[trie.parent[moved]]
    oparent = np.concatenate([parent, gnodes])
    orows = np.concatenate([trie.rows, np.zeros(len(gnodes), np.int64)])
    opre = np.concatenate([sub_tok, np.zeros(len(gnodes), np.int64)])
    oends = np.concatenate([trie.ends, trie.ends[gnodes]])
    oends[gnodes] = 0
    olo = np.concatenate([trie.lo, trie.lo[gnodes]])
    # A group's rows and prefill: the rows ending at its node plus its absorbed subtrees.
    np.add.at(orows, parent[moved], trie.rows[moved])
    orows[m:] += trie.ends[gnodes]
    np.add.at(opre, parent[moved], sub_tok[moved])
    ratio = np.where(opre > 0, float(max_tokens) * orows / np.maximum(opre, 1), np.inf)

    kids = np.arange(1, len(oparent), dtype=np.int64)
    srt = kids[np.lexsort((olo[kids], -ratio[kids], oparent[kids]))]
    par = oparent[srt]
    csum = np.cumsum(orows[srt])
    seg_first = np.ones(len(srt), dtype=bool)
    seg_first[1:] = par[1:] != par[:-1]
    seg_base = np.maximum.accumulate(np.where(seg_first, np.arange(len(srt)), 0))
    before = csum - orows[srt] - (csum[seg_base] - orows[srt][seg_base])  # rows of earlier siblings
    off = np.zeros(len(oparent), dtype=np.int64)
    off[srt] = oends[par] + before
    # start[u] = sum of `off` over u and its ancestors (pointer doubling).
    start = off.copy()
    anc = oparent.copy()
    while True:
        has = anc >= 0
        if not has.any():
            break
        start[has] += start[anc[has]]
        anc[has] = anc[anc[has]]
    end_node = trie.end_node_of_sorted()
    holder = np.where(gid[end_node] >= 0, gid[end_node], end_node)
    pos_in_order = start[holder] + (np.arange(len(end_node)) - trie.lo[end_node])
    out = np.empty(len(end_node), dtype=np.int64)
    out[pos_in_order] = np.arange(len(end_node), dtype=np.int64)
    return out


def decode_group_table(trie: PrefixTrie, groups: DecodeGroups, sequence: np.ndarray, block_size: int) -> GroupTable:
    """Our groups as a table, in the order of `sequence` (from `plan_order`); rows = sorted positions."""
    return _table_from_labels(
        groups.label_of_pos, sequence, np.arange(trie.num_nodes, dtype=np.int64), trie.depth_end, block_size
    )
