"""Which shared prefix each decode row attends with, when rows share prefixes at several depths.

Grouped decode attention reads a group's shared prefix once for all its members, their query vectors side
by side in tiles, then each member's own keys one query vector at a time. In plan mode a row's prefix can
be nested (a document shared by 64 rows, under it a question shared by 4 phrasings): grouped by the deepest
prefix, groups of 4 rows fill a quarter of a tile and each reads the whole document again; grouped by the
document, one group of 64 fills its tiles and each row reads its question's few tokens as its own. Each row
takes the depth with the least work per row: the prefix's blocks times the tile lanes its group occupies
(whole tiles, shared by the group's rows), plus the blocks between that depth and the row's deepest prefix
for each of its query vectors, a row's own keys costing OWN_KEY_COST tile lanes each.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence as Seq

from engine.sequence import Sequence

# query vectors side by side in a tile of the CPU decode kernel's shared-prefix pass (kernels/csrc: ROW_CHUNK);
# a row's own keys, read one query vector at a time, took ~4.7x as long per query and key as a full tile's
# (bench/cpu_decode_attention.py's groups case: 800 prefix keys 0.45 ms, 58 own keys 0.155 ms per call)
TILE_ROWS = 32
OWN_KEY_COST = 4.0


def nests(seq: Sequence) -> bool:
    """Whether `seq` started on a prefix that itself started on another: only then has it a choice of depth."""
    return seq.start_prefix is not None and seq.start_prefix.seq.start_prefix is not None


def shared_levels(seq: Sequence) -> tuple[int, ...]:
    """The numbers of leading blocks `seq` shares with other rows, deepest first: those of the prefix it
    started on, then those that prefix shared with its own start prefix, and so on (plan mode's prefix
    tree; other modes have one level). Rows holding the same block at the same index share every block
    before it, so a level is named by (blocks, the last of them) in any row's table."""
    levels = [seq.shared_blocks] if seq.shared_blocks else []
    state = seq.start_prefix
    while state is not None and levels:
        parent = state.seq.shared_blocks
        if 0 < parent < levels[-1]:
            levels.append(parent)
        state = state.seq.start_prefix
    return tuple(levels)


def choose_levels(levels: Seq[tuple[int, ...]], tables: Seq[Seq[int]], rows: Seq[int], heads_per_kv: int) -> list[int]:
    """For each kind of row (its shared levels, deepest first; its block table; how many rows of the step
    are of that kind, i.e. have that deepest prefix): the leading blocks its rows are grouped by (0: none)."""
    count: Counter[tuple[int, int]] = Counter()
    for kind, table, n_rows in zip(levels, tables, rows):
        for n in kind:
            count[(n, table[n - 1])] += n_rows

    def work(n: int, deepest: int, table: Seq[int]) -> tuple[float, int]:
        members = count[(n, table[n - 1])]
        if members < 2:  # a group of one is no group (build_shared_prefix_batch): every key is the row's own
            return OWN_KEY_COST * heads_per_kv * deepest, -n
        lanes = -(-members * heads_per_kv // TILE_ROWS) * TILE_ROWS  # whole tiles
        return n * lanes / members + OWN_KEY_COST * heads_per_kv * (deepest - n), -n  # ties: the deeper

    chosen = []
    for kind, table in zip(levels, tables):
        if len(kind) < 2:
            chosen.append(kind[0] if kind else 0)
        else:
            chosen.append(min(kind, key=lambda n: work(n, kind[0], table)))
    return chosen
