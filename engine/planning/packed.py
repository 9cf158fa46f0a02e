"""Compact storage of many token sequences, and vectorized longest-common-prefix (LCP) of pairs.

At the scale the prefix plan runs (a million prompts of a few hundred tokens) a Python list of ints
costs ~36 bytes per token; here a sequence set is one flat int32 array plus int64 offsets (4 bytes
per token), and every pass over it is a numpy gather over many sequences at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np

# Tokens of one pair compared per vectorized step in `pair_lcp`; grows while pairs keep matching, so
# a long shared prefix costs few steps and a short one wastes little.
_FIRST_WINDOW = 16
_MAX_WINDOW = 512
# Upper bound on pairs * window elements gathered at once (bounds the temporary index matrices).
_GATHER_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PackedSequences:
    """n token sequences: sequence i is `tokens[offsets[i]:offsets[i + 1]]`.

    tokens: int32, shape (total,), all ids >= 0 (-1 is used internally as "past the end").
    offsets: int64, shape (n + 1,), non-decreasing, offsets[0] == 0, offsets[-1] == total.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        t, o = self.tokens, self.offsets
        if not isinstance(t, np.ndarray) or t.dtype != np.int32 or t.ndim != 1:
            raise TypeError("tokens must be a 1-D int32 numpy array.")
        if not isinstance(o, np.ndarray) or o.dtype != np.int64 or o.ndim != 1 or len(o) < 1:
            raise TypeError("offsets must be a 1-D int64 numpy array of length n + 1.")
        if o[0] != 0 or o[-1] != len(t):
            raise ValueError("offsets must start at 0 and end at len(tokens).")
        if len(o) > 1 and bool((np.diff(o) < 0).any()):
            raise ValueError("offsets must be non-decreasing.")
        if len(t) and int(t.min()) < 0:
            raise ValueError("token ids must be non-negative.")

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> "PackedSequences":
        """From Python lists (~70 ns a token); at scale build the flat arrays directly (`from_arrays`)."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(chain.from_iterable(sequences), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets)

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, offsets: np.ndarray) -> "PackedSequences":
        """From a concatenated token array and offsets (converted to int32/int64 if needed)."""
        return cls(np.ascontiguousarray(tokens, dtype=np.int32), np.ascontiguousarray(offsets, dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence["PackedSequences"]) -> "PackedSequences":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        tokens = np.concatenate([p.tokens for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(tokens, offsets)

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64, shape (n,)."""
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def row(self, i: int) -> np.ndarray:
        """Token ids of sequence i (a view)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def slice(self, start: int, stop: int) -> "PackedSequences":
        """Sequences start..stop-1 sharing this set's token array (no token copy)."""
        offsets = self.offsets[start : stop + 1]
        return PackedSequences(self.tokens[offsets[0] : offsets[-1]], offsets - offsets[0])

    def take(self, rows: np.ndarray) -> "PackedSequences":
        """The sequences `rows` (int indices), in that order, as a new packed set."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Source position of every output token: its row's start plus its index within the row.
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        src = np.repeat(self.offsets[:-1][rows], lengths) + within
        return PackedSequences(self.tokens[src], offsets)


def token_windows(tokens: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """int32 (len(pos), width): row k is tokens[pos[k] : pos[k] + width], -1 past the array's end.

    Rows are copied out of a zero-copy sliding-window view (one contiguous copy per row), which is
    several times faster than an element-wise gather through an index matrix. The caller clips by
    sequence length: a window may run into the next sequence's tokens.
    """
    pos = np.asarray(pos, dtype=np.int64)
    total = len(tokens)
    out = np.empty((len(pos), width), dtype=np.int32)
    body_end = total - width + 1  # rows starting before this lie wholly inside the array
    inside = pos < body_end
    if body_end > 0 and inside.any():
        view = np.lib.stride_tricks.sliding_window_view(tokens, width)
        if inside.all():
            return view[pos]
        out[inside] = view[pos[inside]]
    rest = ~inside
    if rest.any():
        # The last few windows: read from a small copy of the array's tail padded with -1.
        base = max(0, total - width)
        tail = np.concatenate([tokens[base:], np.full(width, -1, dtype=np.int32)])
        tail_view = np.lib.stride_tricks.sliding_window_view(tail, width)
        out[rest] = tail_view[np.minimum(pos[rest] - base, len(tail_view) - 1)]
    return out


def window_mismatch(
    win_a: np.ndarray, left_a: np.ndarray, win_b: np.ndarray, left_b: np.ndarray
) -> np.ndarray:
    """First position where two sequences differ inside a window, or the window width if none.

    win_a/win_b: (m, width) raw windows; left_a/left_b: tokens each sequence still has from the
    window start (may exceed width or be <= 0). A sequence that has ended differs from one that has
    not; two that end at the same place agree from there on (as if padded with an end marker).
    """
    width = win_a.shape[1]
    neq = win_a != win_b
    raw = np.where(neq.any(axis=1), np.argmax(neq, axis=1), width)
    shorter = np.clip(np.minimum(left_a, left_b), 0, width)
    # Agreeing through the shorter one's end: equal when both end there (or both run past the window).
    tie = np.where((left_a == left_b) | (shorter >= width), width, shorter)
    return np.where(raw < shorter, raw, tie)


def pair_lcp(
    tokens_a: np.ndarray,
    offsets_a: np.ndarray,
    a: np.ndarray,
    tokens_b: np.ndarray,
    offsets_b: np.ndarray,
    b: np.ndarray,
) -> np.ndarray:
    """LCP of sequence a[k] of set A with sequence b[k] of set B, for all k at once (int64).

    Pairs are compared a window at a time; pairs that match through a whole window continue with a
    doubled window, so the cost is about the sum of the LCPs plus one window per pair.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    sa = offsets_a[a]
    sb = offsets_b[b]
    limit = np.minimum(offsets_a[a + 1] - sa, offsets_b[b + 1] - sb)
    out = np.zeros(len(a), dtype=np.int64)
    active = np.nonzero(limit > 0)[0]
    width = _FIRST_WINDOW
    while len(active):
        step = max(1, _GATHER_ELEMENTS // width)
        still: list[np.ndarray] = []
        for c in range(0, len(active), step):
            idx = active[c : c + step]
            d = out[idx]
            wa = token_windows(tokens_a, sa[idx] + d, width)
            wb = token_windows(tokens_b, sb[idx] + d, width)
            neq = wa != wb
            adv = np.where(neq.any(axis=1), np.argmax(neq, axis=1), width)
            new = np.minimum(d + adv, limit[idx])
            out[idx] = new
            still.append(idx[(adv == width) & (new < limit[idx])])
        active = np.concatenate(still)
        width = min(width * 2, _MAX_WINDOW)
    return out


def neighbor_lcp(seqs: PackedSequences, order: np.ndarray | None = None) -> np.ndarray:
    """lcp[i] = LCP(seq order[i-1], seq order[i]); lcp[0] = 0. `order` defaults to 0..n-1."""
    n = seqs.n
    if order is None:
        order = np.arange(n, dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    if n > 1:
        out[1:] = pair_lcp(seqs.tokens, seqs.offsets, order[:-1], seqs.tokens, seqs.offsets, order[1:])
    return out
