"""Lexicographic order of many token sequences and the LCP of sorted neighbours, in memory.

Method: most-significant-first refinement of segments (ranges of the order array whose members are
known to share their first `depth` tokens). Every round compares each member of every unresolved
segment with the segment's first member over a window of tokens (one numpy gather), so a prefix
shared by a whole segment is skipped a window at a time instead of being sorted token by token.
A segment whose members differ inside the window is split at the first differing position by one
stable sort of (segment, token at that position); the LCP between the new neighbours across a split
is exactly that position, so the LCP array falls out of the sort without another pass.

Cost: about (members still unresolved) x (window) per round; rounds ~ deepest distinguishing prefix
/ window + number of branchings on it. Memory: the order and LCP arrays (16 bytes per sequence) plus
chunked temporaries, besides the token array itself.

Ties (identical sequences) keep input order (all sorts are stable), and a sequence sorts before its
extensions, like DuckDB's ORDER BY on LIST<INTEGER> with the row index as tie-breaker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.planning.packed import PackedSequences, token_windows, window_mismatch

_MIN_WINDOW = 8
_MAX_WINDOW = 256
_START_WINDOW = 32
_GATHER_ELEMENTS = 1 << 22  # members x window per chunk


@dataclass(frozen=True)
class SortedSequences:
    """order: int64 (n,), sorted position -> row index; lcp: int64 (n,),
    lcp[i] = LCP(row order[i-1], row order[i]) and lcp[0] = 0."""

    order: np.ndarray
    lcp: np.ndarray


def sort_sequences(seqs: PackedSequences) -> SortedSequences:
    """Sort sequences lexicographically (prefix before extension, ties by row index) with LCPs."""
    n = seqs.n
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(n, dtype=np.int64)
    if n <= 1:
        return SortedSequences(order, lcp)
    tokens = seqs.tokens
    starts = seqs.offsets[:-1]
    ends = seqs.offsets[1:]
    lens = ends - starts

    # Unresolved segments: order[lo:hi] share their first `depth` tokens; size >= 2.
    seg_lo = np.zeros(1, dtype=np.int64)
    seg_hi = np.full(1, n, dtype=np.int64)
    seg_depth = np.zeros(1, dtype=np.int64)
    width = _START_WINDOW
    while len(seg_lo):
        n_seg = len(seg_lo)
        sizes = seg_hi - seg_lo
        total = int(sizes.sum())
        mem_start = np.cumsum(sizes) - sizes  # index of each segment's first member in member arrays
        mem_seg = np.repeat(np.arange(n_seg, dtype=np.int64), sizes)
        pos = np.arange(total, dtype=np.int64) + np.repeat(seg_lo - mem_start, sizes)
        members = order[pos]
        heads = order[seg_lo]
        head_pos = starts[heads] + seg_depth
        head_left = ends[heads] - head_pos
        head_win = token_windows(tokens, head_pos, width)  # (n_seg, width)

        # First mismatch of every member against its head within the window.
        mis = np.empty(total, dtype=np.int64)
        step = max(1, _GATHER_ELEMENTS // width)
        for c in range(0, total, step):
            m = members[c : c + step]
            s = mem_seg[c : c + step]
            m_pos = starts[m] + seg_depth[s]
            win = token_windows(tokens, m_pos, width)
            mis[c : c + step] = window_mismatch(win, ends[m] - m_pos, head_win[s], head_left[s])
        adv = np.minimum.reduceat(mis, mem_start)  # per segment: tokens all members share further

        same = adv == width
        # All members equal the head through the window, including the end marker after the head's
        # last token (so the head must end strictly inside the window): duplicates.
        dup = same & (lens[heads] < seg_depth + width)
        if dup.any():
            mask = dup[mem_seg]
            mask[mem_start] = False  # a segment's first LCP was set when the segment was created
            lcp[pos[mask]] = lens[heads][mem_seg[mask]]
        cont = same & ~dup

        split = ~same
        new_lo = [seg_lo[cont]]
        new_hi = [seg_hi[cont]]
        new_depth = [seg_depth[cont] + width]
        if split.any():
            sm = split[mem_seg]
            sp_pos = pos[sm]
            sp_members = members[sm]
            sp_seg = mem_seg[sm]
            # Dense rank of the segment among split segments keeps the combined key in 63 bits.
            seg_rank = np.cumsum(split) - 1
            at = (seg_depth + adv)[sp_seg]  # the split position of each member's segment
            key = np.full(len(sp_members), -1, dtype=np.int64)
            live = at < lens[sp_members]
            key[live] = tokens[starts[sp_members[live]] + at[live]]
            combined = (seg_rank[sp_seg] << 32) | (key + 1)
            perm = np.argsort(combined, kind="stable")
            order[sp_pos] = sp_members[perm]
            combined = combined[perm]
            key = key[perm]
            at = at[perm]  # constant within a segment, so permuting keeps it aligned
            sp_seg = sp_seg[perm]
            # Sub-segment boundaries: a new key or a new parent segment.
            is_start = np.ones(len(combined), dtype=bool)
            is_start[1:] = combined[1:] != combined[:-1]
            parent_first = np.ones(len(combined), dtype=bool)
            parent_first[1:] = sp_seg[1:] != sp_seg[:-1]
            boundary = is_start & ~parent_first
            lcp[sp_pos[boundary]] = at[boundary]
            # Members that ended at the split position are identical to each other: LCP = length.
            ended_inner = (key == -1) & ~is_start
            lcp[sp_pos[ended_inner]] = at[ended_inner]
            sub_start = np.nonzero(is_start)[0]
            sub_end = np.append(sub_start[1:], len(combined))
            keep = ((sub_end - sub_start) >= 2) & (key[sub_start] >= 0)
            new_lo.append(sp_pos[sub_start[keep]])
            new_hi.append(sp_pos[sub_start[keep]] + (sub_end - sub_start)[keep])
            new_depth.append(at[sub_start[keep]] + 1)
        # Window for the next round: grow while whole segments keep matching, shrink when they split.
        if sizes[same].sum() * 2 >= total:
            width = min(width * 2, _MAX_WINDOW)
        else:
            width = max(width // 2, _MIN_WINDOW)
        seg_lo = np.concatenate(new_lo)
        seg_hi = np.concatenate(new_hi)
        seg_depth = np.concatenate(new_depth)
    return SortedSequences(order, lcp)
