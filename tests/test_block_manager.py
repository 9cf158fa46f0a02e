"""The block manager hands a large grow one run of consecutive blocks when the free blocks hold one
(the CPU attention then reads a prefix in place), falls back to any free blocks when they do not,
and keeps the automatic prefix cache's reuse order in lru mode."""
from __future__ import annotations

import random

from engine.block_manager import CONTIGUOUS_MIN_BLOCKS, BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

N = CONTIGUOUS_MIN_BLOCKS


def _seq(tokens: int) -> Sequence:
    return Sequence(object(), list(range(tokens)), SamplingParams(max_tokens=1), 1)


def _consecutive(table: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(table, table[1:]))


def test_large_grows_get_runs_among_scattered_free_blocks() -> None:
    bm = BlockManager(num_blocks=6 * N, block_size=4)
    ones = [_seq(4) for _ in range(6 * N)]
    for s in ones:
        bm.grow(s, 4)  # one block each: seq i holds block i
    assert [s.block_table for s in ones[:3]] == [[0], [1], [2]]
    for i, s in enumerate(ones):
        if i % 2 == 0 or 2 * N <= i < 3 * N + 2:
            bm.free(s)  # single holes everywhere, and one hole of N + 2 consecutive blocks
    big = _seq(4 * (N + 1))
    bm.grow(big, len(big))
    assert big.block_table == list(range(2 * N, 3 * N + 1))
    assert all(bm.ref_counts[b] == 1 for b in big.block_table)
    # no run left: a large grow takes scattered blocks, never one already held
    rest = _seq(4 * bm.num_free_blocks)
    bm.grow(rest, len(rest))
    assert bm.num_free_blocks == 0 and not _consecutive(rest.block_table)
    held = [b for s in ones for b in s.block_table] + big.block_table
    assert not set(rest.block_table) & set(held) and len(set(rest.block_table)) == len(rest.block_table)
    for s in [big, rest, *ones]:
        bm.free(s)
    again = _seq(4 * 3 * N)
    bm.grow(again, len(again))
    assert _consecutive(again.block_table)


def test_lru_mode_keeps_its_reuse_order() -> None:
    bm = BlockManager(num_blocks=2 * N, block_size=4, prefix_cache=True)
    a, b = _seq(4 * N), _seq(4 * N)
    bm.grow(a, len(a))
    bm.grow(b, len(b))
    bm.free(a)
    bm.free(b)
    c = _seq(4 * 2 * N)
    bm.grow(c, len(c))
    # least recently freed first, each chain's last block first (its least likely hit)
    assert c.block_table == list(range(N))[::-1] + list(range(N, 2 * N))[::-1]
