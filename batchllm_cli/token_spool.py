"""Token ids of a job's prompts on disk, and how much memory planning them in memory takes.

`analyze` and `run` both tokenize every row once, append the ids to a spool file (no Python list of
ints ever holds more than one batch), and then sort the spooled sequences: in memory (numpy) when the
estimate fits the budget, else out of core with DuckDB spilling to the spool's directory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from engine import PackedSequences

# Memory of the in-memory plan, measured on 1M rows (bench/analyze_scale.py): the token array itself
# (4 bytes per token) plus sort order, LCPs, trie, group tables and temporaries (~0.6 KB per row,
# rounded up), plus a fixed part for the chunked temporaries of the sort and the LRU walk.
PLAN_BYTES_PER_TOKEN = 4
PLAN_BYTES_PER_ROW = 1024
PLAN_BYTES_FIXED = 256 << 20
# Memory DuckDB may use for the out-of-core sort before it spills to the temporary directory.
OUT_OF_CORE_SORT_MEMORY = "1GB"
OUT_OF_CORE_BATCH_ROWS = 65536


def estimate_plan_memory(tokens: int, rows: int) -> int:
    """Bytes the in-memory plan of `rows` prompts with `tokens` tokens in all needs at its peak."""
    return PLAN_BYTES_PER_TOKEN * tokens + PLAN_BYTES_PER_ROW * rows + PLAN_BYTES_FIXED


def available_memory() -> int:
    """MemAvailable (Linux), else total physical memory; 4 GiB when neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_memory_budget() -> int:
    """The in-memory plan is chosen when its estimate fits in half the available memory."""
    return available_memory() // 2


@dataclass(frozen=True)
class SortChoice:
    """How a job's spooled prompts are sorted for its plan, and why."""

    out_of_core: bool  # DuckDB's sort spilling to disk, else numpy in memory
    estimate: int  # bytes the in-memory plan needs at its peak (estimate_plan_memory)
    budget: int  # bytes it may take
    forced: bool = False  # the user chose (analyze --in-memory / --out-of-core), not the estimate


def choose_sort(tokens: int, rows: int, budget: int | None = None, out_of_core: bool | None = None) -> SortChoice:
    """The one decision `analyze` and `run` both make: in memory when the estimate fits `budget` (None:
    `default_memory_budget()`), unless `out_of_core` forces either way."""
    estimate = estimate_plan_memory(tokens, rows)
    budget = default_memory_budget() if budget is None else budget
    if out_of_core is not None:
        return SortChoice(out_of_core, estimate, budget, forced=True)
    return SortChoice(estimate > budget, estimate, budget)


class TokenSpool:
    """Token ids of every planned row, appended batch by batch to a file (int32, row after row),
    with their lengths and table row ids in memory (16 bytes per row)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "tokens.i32"
        self._file = self.path.open("wb")
        self._lengths: list[np.ndarray] = []
        self._row_ids: list[np.ndarray] = []
        self.tokens = 0
        self._offsets: np.ndarray | None = None

    def append(self, row_ids: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
        self._lengths.append(lengths)
        self._row_ids.append(row_ids)
        self.tokens += len(tokens)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    @property
    def row_ids(self) -> np.ndarray:
        return np.concatenate(self._row_ids) if self._row_ids else np.zeros(0, np.int64)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            lengths = self.lengths
            off = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=off[1:])
            self._offsets = off
        return self._offsets

    def read_all(self) -> np.ndarray:
        self.close()
        return np.fromfile(self.path, dtype=np.int32)

    def read_rows(self, start: int, stop: int) -> PackedSequences:
        """Rows start..stop-1 (plan indices) as packed sequences read from the file."""
        from engine import PackedSequences

        self.close()
        off = self.offsets
        count = int(off[stop] - off[start])
        tokens = np.fromfile(self.path, dtype=np.int32, count=count, offset=4 * int(off[start]))
        return PackedSequences(tokens, off[start : stop + 1] - off[start])

    def iter_batches(self, batch_rows: int) -> Iterator[PackedSequences]:
        n = len(self.offsets) - 1
        for start in range(0, n, batch_rows):
            yield self.read_rows(start, min(start + batch_rows, n))

    def row_prefix(self, row: int, length: int) -> np.ndarray:
        self.close()
        start = int(self.offsets[row])
        return np.fromfile(self.path, dtype=np.int32, count=length, offset=4 * start)

    def packed_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spooled rows `rows` (in that order) packed: (tokens int32 (t,), offsets int64 (len(rows) + 1,)),
        each row read with pread straight into its place: the only memory taken is the result's."""
        self.close()
        offsets = self.offsets
        lengths = offsets[rows + 1] - offsets[rows]
        packed = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=packed[1:])
        tokens = np.empty(int(packed[-1]), dtype=np.int32)
        view = memoryview(tokens).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, at, n in zip(offsets[rows].tolist(), packed[:-1].tolist(), lengths.tolist()):
                got = os.preadv(fd, [view[4 * at : 4 * (at + n)]], 4 * start)
                assert got == 4 * n, (got, n)
        finally:
            os.close(fd)
        return tokens, packed

    @contextmanager
    def row_reader(self) -> Iterator[Callable[[int], list[int]]]:
        """row(i): spooled row i's token ids, read with pread. Only the kernel's page cache holds the
        spool then: a memory map of it would count every page touched in this process's memory, and
        rows taken in sorted order from a shuffled table touch all of it (1.2 GiB at 1M rows x 300)."""
        self.close()
        offsets = self.offsets
        fd = os.open(self.path, os.O_RDONLY)

        def row(i: int) -> list[int]:
            start, stop = int(offsets[i]), int(offsets[i + 1])
            data = os.pread(fd, 4 * (stop - start), 4 * start)
            assert len(data) == 4 * (stop - start)
            return np.frombuffer(data, dtype=np.int32).tolist()

        try:
            yield row
        finally:
            os.close(fd)


def sort_spool(spool: TokenSpool, budget: int | None, spill_dir: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """(order, lcp, out_of_core): the spooled rows' lexicographic order (spool indices, ties by index)
    and the LCP of each row with the one sorted before it (lcp[0] = 0), both int64 (n,). In memory when
    `choose_sort` says so for `budget`, else DuckDB's sort spilling to `spill_dir`; the same order
    either way. Only O(rows) arrays stay in memory afterwards."""
    from engine import PackedSequences, SortedStreamPlanner, sort_sequences

    n = len(spool.offsets) - 1
    if not choose_sort(spool.tokens, n, budget).out_of_core:
        ordered = sort_sequences(PackedSequences(spool.read_all(), spool.offsets))
        return ordered.order, ordered.lcp, False

    from batchllm_cli.table_io.token_sort import sort_sequences_out_of_core

    planner = SortedStreamPlanner()  # neighbour LCPs across the sorted batches, O(rows) state
    for rows, batch in sort_sequences_out_of_core(
        spool.iter_batches(OUT_OF_CORE_BATCH_ROWS),
        memory_limit=OUT_OF_CORE_SORT_MEMORY,
        temp_directory=str(spill_dir),
        batch_rows=OUT_OF_CORE_BATCH_ROWS,
    ):
        planner.feed(rows, batch)
    ordered, _, _ = planner.finish()
    return ordered.order, ordered.lcp, True
