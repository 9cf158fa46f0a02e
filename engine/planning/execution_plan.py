"""The execution plan: which shared prefixes `run` computes once, in what order everything runs, and
which rows decode together. `run` executes it (LLMEngine.add_planned); `analyze` reports its numbers.

From the compact trie (trie.py): every trie node below the root that two or more rows pass through is
a shared prefix, computed exactly once, starting on its parent prefix's KV (the parent's whole blocks
are shared, its partial last block is copied on write). A row starts on its deepest shared prefix and
computes only the rest; a row that ends exactly at a prefix (a duplicate, or a prompt others extend)
computes nothing and samples its first token from the logits the prefix kept. So the plan's prefill
is exactly the trie's token count.

Run order: depth-first over the trie; among siblings the larger expected decode per prefill token
first (decode of the rows below / unique tokens below, edge included), so long decodes overlap later
prefill; rows ending at a node need no prefill and lead it; ties keep sorted order.

Decode groups are what the model runner forms (model_runner._group_key): rows decoding in one step
that hold the same physical KV block at the same index read their shared leading blocks once. A row
holds its start prefix's whole blocks, w = start_len // block_size of them; block w-1 was computed
by the shallowest prefix on its path that reaches w whole blocks, so (w, that prefix) is its group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.planning.packed import PackedSequences
from engine.planning.sort import sort_sequences
from engine.planning.trie import PrefixTrie, build_trie


@dataclass(frozen=True)
class ExecutionPlan:
    """Row indices are positions in the planned input (0..n-1); prefix ids are 0..p-1 in run order.

    sorted_rows (n,): sorted position -> row index (the order the trie was built from).
    prefix_node (p,): trie node of each prefix; prefix_parent (p,): the prefix it starts on (-1: none);
    prefix_length (p,): its tokens from the start of the prompt; prefix_source_row (p,): a row that
        begins with it; prefix_dependents (p,): child prefixes + rows starting on it;
    prefix_keeps_logits (p,): a row ends exactly there and samples its first token from its logits.
    item_is_prefix, item_index (p + n,): the run order; index is a prefix id or a row index.
    row_start_prefix (n,): prefix each row starts on (-1: none); row_start_len (n,): its length (0).
    """

    trie: PrefixTrie
    sorted_rows: np.ndarray
    lengths: np.ndarray
    prefix_node: np.ndarray
    prefix_parent: np.ndarray
    prefix_length: np.ndarray
    prefix_source_row: np.ndarray
    prefix_dependents: np.ndarray
    prefix_keeps_logits: np.ndarray
    item_is_prefix: np.ndarray
    item_index: np.ndarray
    row_start_prefix: np.ndarray
    row_start_len: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def num_prefixes(self) -> int:
        return len(self.prefix_node)

    @property
    def unique_prompt_tokens(self) -> int:
        """The trie's token count: the least prefill any plan can do."""
        return int(self.trie.span.sum())

    @property
    def prefix_start_len(self) -> np.ndarray:
        """(p,): tokens each prefix reuses from the prefix it starts on (0: none)."""
        return np.append(self.prefix_length, 0)[self.prefix_parent]  # parent -1 -> the appended 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens the plan computes: each prefix past its parent, each row past its start prefix."""
        return int((self.prefix_length - self.prefix_start_len).sum() + (self.lengths - self.row_start_len).sum())

    @property
    def row_order(self) -> np.ndarray:
        """Row indices in the order they run."""
        return self.item_index[~self.item_is_prefix]


def build_execution_plan(
    trie: PrefixTrie, sorted_rows: np.ndarray, lengths: np.ndarray, max_tokens: int | np.ndarray
) -> ExecutionPlan:
    """The plan of the rows the trie was built from. sorted_rows: sorted position -> row index;
    lengths (n,): prompt length per row index; max_tokens: expected decode per row (scalar or (n,))."""
    sorted_rows = np.asarray(sorted_rows, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n, m = len(sorted_rows), trie.num_nodes
    decode = np.broadcast_to(np.asarray(max_tokens, dtype=np.float64), (n,))[sorted_rows]
    parent = trie.parent
    is_prefix = trie.rows >= 2
    is_prefix[0] = False  # the root shares no tokens
    end_node = trie.end_node_of_sorted()

    # Ordering tree: node units 0..m-1 (the root is the tree's root) and row units m + sorted position,
    # each row under the node it ends at. Siblings by expected decode per prefill token, descending.
    decode_csum = np.zeros(n + 1)
    np.cumsum(decode, out=decode_csum[1:])
    sub_tokens = trie.subtree_tokens()
    node_ratio = (decode_csum[trie.hi] - decode_csum[trie.lo]) / np.maximum(sub_tokens, 1)
    unit_parent = np.concatenate([parent, end_node])
    unit_ratio = np.concatenate([node_ratio, np.full(n, np.inf)])
    unit_lo = np.concatenate([trie.lo, np.arange(n, dtype=np.int64)])
    # A node's subtree holds its trie nodes (pre-order ids v..subtree_end-1) and its rows.
    unit_size = np.concatenate([trie.subtree_end() - np.arange(m) + trie.rows, np.ones(n, dtype=np.int64)])
    pos = _preorder(unit_parent, unit_ratio, unit_lo, unit_size)

    by_pos = np.argsort(pos, kind="stable")
    keep = np.where(by_pos < m, is_prefix[np.minimum(by_pos, m - 1)], True)
    units = by_pos[keep]
    item_is_prefix = units < m
    prefix_node = units[item_is_prefix]
    prefix_of_node = np.full(m, -1, dtype=np.int64)
    prefix_of_node[prefix_node] = np.arange(len(prefix_node), dtype=np.int64)
    item_index = np.where(item_is_prefix, prefix_of_node[np.minimum(units, m - 1)], 0)
    item_index[~item_is_prefix] = sorted_rows[units[~item_is_prefix] - m]

    # Start prefix: a row's end node if shared, else its parent (a one-row leaf hangs off a prefix or
    # the root); a prefix starts on its parent node, which is a prefix or the root.
    start_node = np.where(is_prefix[end_node], end_node, np.maximum(parent[end_node], 0))  # an empty row: root
    row_start_prefix = np.empty(n, dtype=np.int64)
    row_start_prefix[sorted_rows] = prefix_of_node[start_node]
    row_start_len = np.empty(n, dtype=np.int64)
    row_start_len[sorted_rows] = np.where(start_node > 0, trie.depth_end[start_node], 0)
    prefix_parent = prefix_of_node[np.maximum(parent[prefix_node], 0)]
    dependents = np.bincount(prefix_parent[prefix_parent >= 0], minlength=len(prefix_node))
    started = row_start_prefix[row_start_prefix >= 0]
    dependents += np.bincount(started, minlength=len(prefix_node))
    return ExecutionPlan(
        trie=trie,
        sorted_rows=sorted_rows,
        lengths=lengths,
        prefix_node=prefix_node,
        prefix_parent=prefix_parent,
        prefix_length=trie.depth_end[prefix_node],
        prefix_source_row=sorted_rows[trie.lo[prefix_node]],
        prefix_dependents=dependents.astype(np.int64),
        prefix_keeps_logits=trie.ends[prefix_node] > 0,
        item_is_prefix=item_is_prefix,
        item_index=item_index.astype(np.int64),
        row_start_prefix=row_start_prefix,
        row_start_len=row_start_len,
    )


def plan_execution(seqs: PackedSequences, max_tokens: int | np.ndarray) -> ExecutionPlan:
    """Sort `seqs` in memory, build their trie, and plan them (row i = sequence i)."""
    srt = sort_sequences(seqs)
    trie = build_trie(seqs.lengths[srt.order], srt.lcp)
    return build_execution_plan(trie, srt.order, seqs.lengths, max_tokens)


def _preorder(parent: np.ndarray, ratio: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Pre-order position of every unit of a tree (unit 0 is the root, parent -1), children visited
    by ratio descending then lo ascending; size = units in each subtree."""
    kids = np.arange(1, len(parent), dtype=np.int64)
    srt = kids[np.lexsort((lo[kids], -ratio[kids], parent[kids]))]
    par = parent[srt]
    csum = np.cumsum(size[srt])
    seg_first = np.ones(len(srt), dtype=bool)
    seg_first[1:] = par[1:] != par[:-1]
    seg_base = np.maximum.accumulate(np.where(seg_first, np.arange(len(srt)), 0))
    before = csum - size[srt] - (csum[seg_base] - size[srt][seg_base])  # units of earlier siblings
    pos = np.zeros(len(parent), dtype=np.int64)
    pos[srt] = 1 + before
    # pos[u] = sum of offsets over u and its ancestors (pointer doubling).
    anc = parent.copy()
    while True:
        has = anc >= 0
        if not has.any():
            return pos
        pos[has] += pos[anc[has]]
        anc[has] = anc[anc[has]]


@dataclass(frozen=True)
class DecodeGroups:
    """Groups of rows that decode against one shared run of whole KV blocks, in run order.

    shared_len (g,): tokens of whole blocks the members share; row_offsets (g+1,), rows (n_grouped,):
    members of group k are rows[row_offsets[k]:row_offsets[k+1]] (row indices, run order). Rows that
    share no whole block with another row are not in a group (`plain_rows` of them).
    """

    shared_len: np.ndarray
    row_offsets: np.ndarray
    rows: np.ndarray
    plain_rows: int

    @property
    def num_groups(self) -> int:
        return len(self.shared_len)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def members(self, k: int) -> np.ndarray:
        return self.rows[self.row_offsets[k] : self.row_offsets[k + 1]]

    @property
    def saved_reads(self) -> int:
        """Prefix KV token reads one decode step saves when every group decodes together."""
        return int(((self.sizes - 1) * self.shared_len).sum())


def decode_groups(plan: ExecutionPlan, block_size: int) -> DecodeGroups:
    """The groups the model runner forms for this plan (module docstring)."""
    trie = plan.trie
    m = trie.num_nodes
    whole = trie.depth_end // block_size
    parent = np.maximum(trie.parent, 0)
    # Topmost ancestor-or-self prefix with as many whole blocks: it computed the last shared block.
    same = (trie.parent > 0) & (whole[parent] == whole)
    top = np.where(same, parent, np.arange(m, dtype=np.int64))
    while True:
        nxt = top[top]
        if np.array_equal(nxt, top):
            break
        top = nxt
    row_order = plan.row_order
    start = plan.row_start_prefix[row_order]
    node = np.append(plan.prefix_node, 0)[start]  # start -1 (none) -> the root
    key = np.where((start >= 0) & (whole[node] > 0), top[node], -1)
    counts = np.bincount(key[key >= 0], minlength=m)
    grouped = (key >= 0) & (counts[np.maximum(key, 0)] >= 2)
    members = row_order[grouped]
    keys = key[grouped]
    # Groups listed by their first member in run order; members keep run order.
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq), dtype=np.int64)
    group_of = rank[inverse]
    perm = np.argsort(group_of, kind="stable")
    offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(np.bincount(group_of, minlength=len(uniq)), out=offsets[1:])
    head = uniq[np.argsort(rank)] if len(uniq) else uniq
    return DecodeGroups(
        shared_len=(whole[head] * block_size).astype(np.int64),
        row_offsets=offsets,
        rows=members[perm].astype(np.int64),
        plain_rows=int(plan.rows - len(members)),
    )
