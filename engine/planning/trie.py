"""Compact token trie of sorted sequences, built in one streaming pass from their LCPs.

The construction is the suffix-tree-from-LCP-array one: walking the sorted sequences, a stack holds
the path from the root to the previous sequence's node; an LCP of l with the next sequence closes
every node deeper than l and, where no node sits at depth l yet, creates the branching node there.
Only the sequence lengths and the neighbour LCPs are needed, so sorted batches can be fed as they
stream out of an out-of-core sort.

Every node is a range [lo, hi) of sorted positions (the rows below it are contiguous in sorted
order) and a token span (depth_start, depth_end] of the rows' common prefix. Identical sequences
end at the same node (ends > 1); a sequence that is a prefix of another ends at an internal node.
Rows that end at a node come first in its range (a sequence sorts before its extensions).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixTrie:
    """Nodes numbered in pre-order (node 0 is the root; siblings in sorted order). All int64 (m,).

    parent: parent node (-1 for the root).
    depth_start, depth_end: the node's tokens are positions [depth_start, depth_end) of every row
        below it; depth_end is the length of the prefix the node stands for.
    lo, hi: rows below the node are sorted positions lo..hi-1 (rows = hi - lo).
    ends: rows whose sequence ends exactly at this node (they are sorted positions lo..lo+ends-1).
    child_offsets (m+1,), children: children of v are children[child_offsets[v]:child_offsets[v+1]],
        in pre-order.
    """

    parent: np.ndarray
    depth_start: np.ndarray
    depth_end: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ends: np.ndarray
    child_offsets: np.ndarray
    children: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def rows(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def span(self) -> np.ndarray:
        """Tokens on the node's own edge (0 for the root)."""
        return self.depth_end - self.depth_start

    def children_of(self, v: int) -> np.ndarray:
        return self.children[self.child_offsets[v] : self.child_offsets[v + 1]]

    def subtree_end(self) -> np.ndarray:
        """Per node v, one past the last node id of its subtree (pre-order makes subtrees id ranges:
        the first node after v's subtree is the first whose rows start at or after v's end)."""
        return np.searchsorted(self.lo, self.hi, side="left").astype(np.int64)

    def subtree_tokens(self) -> np.ndarray:
        """Per node, the tokens of its edge plus all edges below it (unique prefill of the subtree)."""
        csum = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum(self.span, out=csum[1:])
        return csum[self.subtree_end()] - csum[:-1]

    def end_node_of_sorted(self) -> np.ndarray:
        """int64 (n,): for every sorted position, the node its sequence ends at."""
        has = np.nonzero(self.ends)[0]
        # Ends-ranges [lo, lo + ends) of all nodes tile 0..n-1; ordering them by lo lists positions in order.
        has = has[np.argsort(self.lo[has], kind="stable")]
        return np.repeat(has, self.ends[has])


class TrieBuilder:
    """Streaming construction: feed (lengths, lcps) of consecutive sorted batches, then `finish()`.

    lcps[k] is the LCP of the batch's k-th sequence with the sequence just before it in sorted order
    (for the first batch element: with the previous batch's last; 0 at the very start).
    """

    def __init__(self) -> None:
        # Growable int64 arrays (8 bytes per entry; a Python list of ints would cost ~4x).
        self._parent = array("q")
        self._depth = array("q")
        self._lo = array("q")
        self._hi = array("q")
        self._ends = array("q")
        self._stack: list[int] = []  # node ids on the path from the root to the last sequence
        self._stack_depth: list[int] = []
        self._pos = 0
        self._finished = False
        self._push(0, 0)  # the root

    def _push(self, depth: int, lo: int) -> int:
        node = len(self._depth)
        self._parent.append(-1)
        self._depth.append(depth)
        self._lo.append(lo)
        self._hi.append(-1)
        self._ends.append(0)
        self._stack.append(node)
        self._stack_depth.append(depth)
        return node

    def feed(self, lengths: np.ndarray, lcps: np.ndarray) -> None:
        if self._finished:
            raise RuntimeError("TrieBuilder.feed after finish().")
        if len(lengths) != len(lcps):
            raise ValueError("lengths and lcps must have the same length.")
        stack, sdepth = self._stack, self._stack_depth
        parent, depth_arr, lo_arr, hi_arr, ends = self._parent, self._depth, self._lo, self._hi, self._ends
        # Bound methods hoisted out of the loop: it runs once per sequence in pure Python.
        p_app, d_app, lo_app, hi_app, e_app = (
            parent.append, depth_arr.append, lo_arr.append, hi_arr.append, ends.append
        )
        s_push, s_pop, sd_push, sd_pop = stack.append, stack.pop, sdepth.append, sdepth.pop
        pos = self._pos
        new_id = len(depth_arr)
        for length, l in zip(lengths.tolist(), lcps.tolist()):
            if pos == 0:
                l = 0
            # Close the nodes deeper than the shared prefix with the previous sequence.
            while sdepth[-1] > l:
                node = s_pop()
                sd_pop()
                hi_arr[node] = pos
                if sdepth[-1] >= l:
                    parent[node] = stack[-1]
                else:
                    # No node at depth l on the path yet: the branching node starts where `node` did.
                    parent[node] = new_id
                    p_app(-1), d_app(l), lo_app(lo_arr[node]), hi_app(-1), e_app(0)
                    s_push(new_id), sd_push(l)
                    new_id += 1
            # Now the stack top is the node at depth l.
            if length == l:
                ends[stack[-1]] += 1  # duplicate of, or prefix of, what came before
            else:
                p_app(-1), d_app(length), lo_app(pos), hi_app(-1), e_app(1)
                s_push(new_id), sd_push(length)
                new_id += 1
            pos += 1
        self._pos = pos

    def finish(self) -> PrefixTrie:
        """Close all open nodes and return the trie with nodes renumbered in pre-order."""
        if not self._finished:
            stack = self._stack
            while len(stack) > 1:
                node = stack.pop()
                self._hi[node] = self._pos
                self._parent[node] = stack[-1]
            self._hi[stack[0]] = self._pos
            self._finished = True
        depth = np.frombuffer(self._depth, dtype=np.int64)
        lo = np.frombuffer(self._lo, dtype=np.int64)
        # Pre-order = by (first row, depth): an ancestor starts at or before its descendants and,
        # starting at the same row, is shallower; a later sibling starts after the whole subtree.
        perm = np.lexsort((depth, lo))
        new_id = np.empty(len(perm), dtype=np.int64)
        new_id[perm] = np.arange(len(perm), dtype=np.int64)
        old_parent = np.frombuffer(self._parent, dtype=np.int64)[perm]
        parent = np.where(old_parent >= 0, new_id[np.maximum(old_parent, 0)], -1)
        depth_end = depth[perm]
        depth_start = np.where(parent >= 0, depth_end[np.maximum(parent, 0)], 0)
        by_parent = np.argsort(parent[1:], kind="stable") + 1  # children grouped by parent, pre-order
        counts = np.bincount(parent[1:], minlength=len(perm)) if len(perm) > 1 else np.zeros(1, np.int64)
        child_offsets = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(counts, out=child_offsets[1:])
        return PrefixTrie(
            parent=parent,
            depth_start=depth_start,
            depth_end=depth_end,
            lo=lo[perm].copy(),
            hi=np.frombuffer(self._hi, dtype=np.int64)[perm].copy(),
            ends=np.frombuffer(self._ends, dtype=np.int64)[perm].copy(),
            child_offsets=child_offsets,
            children=by_parent.astype(np.int64),
        )


def build_trie(lengths_sorted: np.ndarray, lcp: np.ndarray) -> PrefixTrie:
    """Trie of sequences given by their lengths in sorted order and the sorted neighbour LCPs."""
    builder = TrieBuilder()
    builder.feed(np.asarray(lengths_sorted, dtype=np.int64), np.asarray(lcp, dtype=np.int64))
    return builder.finish()
