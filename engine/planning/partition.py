"""Partitioning one globally sorted job over N engine replicas, by prefix group.

Rows sharing a prefix are contiguous in sorted order, and the neighbour LCPs describe the prefix trie:
the rows below a trie node are a range whose inner LCPs are all at least the node's depth, and its
children are the sub-ranges between the positions where the inner LCP equals its minimum. The
top-level groups are the children of the deepest node holding every row (in a table with a common
template opening: the rows that share more than that opening, e.g. all questions on one document).

A node whose own shared prefix is negligible is no group: rows "[1] ...", "[10] ..." and "[100] ..."
share one token below the template's opening, and scattering such a node's children over replicas
recomputes that token a few times, nothing more. So a node is a top-level group only when splitting it
could cost more than SPLIT_COST_FRACTION of its work ((children - 1) x its depth below the common
prefix); otherwise its children are considered in its place. In a doc-QA table the groups are then the
documents, whatever their labels share.

A group that lands on two replicas has its prefix computed on both, so the partition moves whole
groups; only a group larger than a fair share of the work (total / N) is split, at its own children
(recursively, until each piece fits or is one row). The pieces are then assigned longest first to the
least loaded replica (LPT), whose largest part is at most a fair share plus the largest piece.

Work is estimated as unique prefill tokens plus decode tokens (max_tokens per row): a piece's trie
tokens, plus the part of its prefix above the job's common prefix that its replica may have to compute
again; each replica computes the common prefix once.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import numpy as np

# A trie node is a group only if scattering its children could recompute more than this share of its work.
SPLIT_COST_FRACTION = 0.05


@dataclass(frozen=True)
class Partition:
    """part: int64 (n,), the replica of each row, by sorted position; work: int64 (parts,), each
    replica's estimated tokens; top_groups: the job's top-level prefix groups; split_groups: how many
    of them (or of their descendants) were larger than a fair share and split across pieces."""

    part: np.ndarray
    work: np.ndarray
    top_groups: int
    split_groups: int
    groups: tuple[tuple[int, int], ...] = ()  # the top-level groups as [start, stop) of sorted rows

    @property
    def balance(self) -> float:
        """Largest part's work over the mean part's (1.0 = perfect); what N replicas lose to the slowest."""
        mean = float(self.work.mean()) if len(self.work) else 0.0
        return float(self.work.max()) / mean if mean > 0 else 1.0


def _children(lcp: np.ndarray, a: int, b: int) -> list[tuple[int, int]]:
    """The sub-ranges of sorted rows [a, b) (b - a >= 2) below the deepest node holding them all."""
    inner = lcp[a + 1 : b]
    cuts = (a + 1 + np.flatnonzero(inner == inner.min())).tolist()
    bounds = [a, *cuts, b]
    return list(zip(bounds[:-1], bounds[1:]))


def partition_sorted(lengths_sorted: np.ndarray, lcp: np.ndarray, decode_tokens: int, parts: int) -> Partition:
    """Split a sorted job into `parts` parts of about equal work, never splitting a top-level prefix
    group that fits a fair share.

    lengths_sorted: int64 (n,), prompt lengths in sorted order; lcp: int64 (n,), lcp[i] = LCP of sorted
    rows i-1 and i (lcp[0] = 0); decode_tokens: tokens each row may generate (max_tokens)."""
    assert parts >= 1
    n = len(lengths_sorted)
    lengths_sorted = np.asarray(lengths_sorted, dtype=np.int64)
    lcp = np.asarray(lcp, dtype=np.int64)
    if n == 0:
        return Partition(np.zeros(0, np.int64), np.zeros(parts, np.int64), 0, 0)
    common = int(lcp[1:].min()) if n > 1 else 0  # the prefix every row shares
    # new[i]: the trie tokens row i adds (its tokens below its LCP with the row before) and its decode
    new = lengths_sorted - lcp + decode_tokens
    new[0] -= common  # the common prefix is paid once per replica, below
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new, out=cum[1:])

    def work(a: int, b: int) -> int:
        return int(cum[b] - cum[a]) + int(lcp[a]) - (common if a > 0 else 0)

    fair = (int(cum[n]) + common * parts) / parts
    top = _top_groups(lcp, work, common, n)
    pieces: list[tuple[int, int]] = []
    split = 0
    stack = list(reversed(top))
    while stack:
        a, b = stack.pop()
        if b - a > 1 and work(a, b) > fair:
            split += 1
            stack.extend(reversed(_children(lcp, a, b)))
        else:
            pieces.append((a, b))

    # LPT: the largest piece first, onto the least loaded part (ties: the lower part index)
    order = sorted(range(len(pieces)), key=lambda i: (-work(*pieces[i]), pieces[i][0]))
    loads = [(common, p) for p in range(parts)]
    heapq.heapify(loads)
    part = np.empty(n, dtype=np.int64)
    for i in order:
        load, p = heapq.heappop(loads)
        a, b = pieces[i]
        part[a:b] = p
        heapq.heappush(loads, (load + work(a, b), p))
    totals = np.zeros(parts, dtype=np.int64)
    for load, p in loads:
        totals[p] = load
    return Partition(part, totals, len(top), split, tuple(top))


def _top_groups(lcp: np.ndarray, work: Callable[[int, int], int], common: int, n: int) -> list[tuple[int, int]]:
    """The top-level groups, as ranges of sorted rows, in order (see the module doc)."""
    if n <= 1:
        return [(0, n)] if n else []
    groups: list[tuple[int, int]] = []
    stack = list(reversed(_children(lcp, 0, n)))
    while stack:
        a, b = stack.pop()
        if b - a > 1:
            children = _children(lcp, a, b)
            depth = int(lcp[a + 1 : b].min())  # the node's depth: what all its rows share
            if (len(children) - 1) * (depth - common) <= SPLIT_COST_FRACTION * work(a, b):
                stack.extend(reversed(children))
                continue
        groups.append((a, b))
    return groups


def group_starts(lengths_sorted: np.ndarray, lcp: np.ndarray, decode_tokens: int) -> np.ndarray:
    """int64 (g,), the sorted positions where each top-level prefix group begins (see the module doc)."""
    return np.asarray([a for a, _ in partition_sorted(lengths_sorted, lcp, decode_tokens, 1).groups], dtype=np.int64)
