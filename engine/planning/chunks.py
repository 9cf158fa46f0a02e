"""Cutting one globally sorted job into the chunks the engine plans and admits one at a time.

The whole job is sorted once (every row's prompt, lexicographically), so rows sharing a prefix are
contiguous however the table is ordered. The engine then plans a chunk of consecutive sorted rows at
a time, which bounds the memory of queued requests. A chunk is planned on its own; what rows on both
sides of a cut share is exactly the LCP of the two rows next to it (in sorted order no pair across a
cut shares more), and the engine carries that prefix's KV over the cut (engine/plan_carry.py) instead
of computing it again. Each cut is placed where that LCP is smallest within the second half of the
chunk's token budget (in a document-QA table: between two documents, sharing only the template's
opening), so the state kept pinned across the cut is small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class PlanChunk:
    """Requests (key, token ids, params) of consecutive rows in sorted order, and how many leading
    tokens the last of them shares with the next chunk's first (0 for the last chunk)."""

    requests: Sequence[Any]
    shared_with_next: int = 0


@dataclass(frozen=True)
class ChunkCuts:
    """starts: int64 (k + 1,), sorted positions; chunk i is [starts[i], starts[i + 1]), starts[0] = 0,
    starts[-1] = n. boundary_tokens: prompt tokens shared across the cuts (sum of their LCPs), which the
    engine carries over rather than computing twice."""

    starts: np.ndarray
    boundary_tokens: int

    @property
    def num_chunks(self) -> int:
        return len(self.starts) - 1


def unique_prompt_tokens(lengths_sorted: np.ndarray, lcp: np.ndarray) -> int:
    """Distinct prefixes of all rows = tokens of the compact trie = the least prefill any plan needs."""
    return int(lengths_sorted.sum()) - int(lcp.sum())


def cut_sorted_rows(lengths_sorted: np.ndarray, lcp: np.ndarray, max_chunk_tokens: int) -> ChunkCuts:
    """Chunks of at most `max_chunk_tokens` prompt tokens (a row longer than that is a chunk of its
    own), each cut where the fewest tokens are shared across it.

    lengths_sorted: int64 (n,), prompt lengths in sorted order; lcp: int64 (n,), lcp[i] = LCP of sorted
    rows i-1 and i (lcp[0] = 0)."""
    assert max_chunk_tokens >= 1
    n = len(lengths_sorted)
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths_sorted, out=cum[1:])
    starts = [0]
    boundary = 0
    s = 0
    while s < n:
        # e: the most rows from s that fit the budget (at least one)
        e = max(int(np.searchsorted(cum, cum[s] + max_chunk_tokens, side="right")) - 1, s + 1)
        if e >= n:
            starts.append(n)
            break
        lo = s + max(1, (e - s) // 2)
        window = lcp[lo : e + 1]  # cutting before sorted row p costs lcp[p]
        p = lo + len(window) - 1 - int(np.argmin(window[::-1]))  # the latest of the cheapest cuts
        boundary += int(lcp[p])
        starts.append(p)
        s = p
    return ChunkCuts(np.asarray(starts, dtype=np.int64), boundary)
