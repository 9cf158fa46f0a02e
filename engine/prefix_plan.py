"""The prefix plan: token trie -> groups -> run order, and the numbers `batchllm analyze` reports.

Input is token ids and row keys only (no tables): the CLI tokenizes, calls `plan_prefixes` (or
`plan_prefixes_out_of_core` when the tokens do not fit in memory), decodes the token spans named in
the report back to text and renders them.

Pipeline (see DESIGN.md "The prefix plan"):
  sort + neighbour LCP (prefix_sort, or DuckDB out of core: prefix_sort_duckdb)
  -> compact trie, one streaming pass (prefix_trie)
  -> BatchLLM single-level groups and our decode groups + run order (prefix_groups)
  -> LRU prefix-cache simulation in table order for comparison (lru_simulation)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator, Sequence

import numpy as np

from engine.lru_simulation import LruPrefixCache, LruResult
from engine.packed_sequences import PackedSequences, neighbor_lcp, pair_lcp
from engine.prefix_groups import (
    GroupTable,
    batchllm_groups,
    decode_group_table,
    decode_groups,
    plan_order,
)
from engine.prefix_sort import SortedSequences, sort_sequences
from engine.prefix_trie import PrefixTrie, TrieBuilder


@dataclass(frozen=True)
class GroupSizeStats:
    """Groups that share at least one whole KV block among >= 2 rows; the rest run as plain rows."""

    shared_groups: int
    rows_in_shared_groups: int
    plain_rows: int
    min_size: int
    median_size: float
    max_size: int
    # (smallest size, largest size, number of groups) per power-of-two size bucket.
    histogram: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, table: GroupTable) -> "GroupSizeStats":
        sizes = table.sizes
        shared = sizes[(table.shared_len > 0) & (sizes >= 2)]
        hist: list[tuple[int, int, int]] = []
        if len(shared):
            bucket = np.floor(np.log2(shared)).astype(np.int64)
            for b, c in zip(*np.unique(bucket, return_counts=True)):
                hist.append((1 << int(b), (1 << (int(b) + 1)) - 1, int(c)))
        return cls(
            shared_groups=int(len(shared)),
            rows_in_shared_groups=int(shared.sum()),
            plain_rows=int(sizes.sum() - shared.sum()),
            min_size=int(shared.min()) if len(shared) else 0,
            median_size=float(np.median(shared)) if len(shared) else 0.0,
            max_size=int(shared.max()) if len(shared) else 0,
            histogram=tuple(hist),
        )


@dataclass(frozen=True)
class SharedPrefix:
    """A prefix shared by `rows` rows: the first `length` tokens of row `row` (key `key`)."""

    node: int
    row: int
    key: Hashable
    sorted_index: int
    length: int
    rows: int
    saved_tokens: int  # (rows - 1) * length: prefill tokens saved by computing it once


@dataclass(frozen=True)
class IcicleNode:
    """One trie node for an icicle chart: tokens [depth_start, depth_end) of row `row` (key `key`)
    are the node's own span; its width is `rows`. The root has parent -1 and an empty span."""

    node: int
    parent: int
    depth_start: int
    depth_end: int
    rows: int
    row: int
    key: Hashable


@dataclass(frozen=True)
class PrefixPlanReport:
    rows: int
    prompt_tokens: int
    unique_prompt_tokens: int  # trie size: the least prefill any engine can do
    sharing_ratio: float  # 1 - unique / prompt
    block_size: int
    kv_cache_tokens: int | None
    plan_prefill_tokens: int  # ours: every trie node once (== unique_prompt_tokens)
    batchllm_prefill_tokens: int  # BatchLLM single-level, block-aligned prefixes
    lru_prefill_tokens: int | None  # LRU prefix cache of kv_cache_tokens, table order
    groups: GroupSizeStats  # ours (decode groups)
    batchllm_groups: GroupSizeStats
    decode_saved_reads: int  # prefix KV token reads one decode step saves with our groups
    top_prefixes: tuple[SharedPrefix, ...]
    icicle: tuple[IcicleNode, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (keys are passed through as they are)."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class PlanGroup:
    """One group for the scheduler: `rows` (row indices) and their `keys` decode together against
    the shared prefix of trie node `node` (the first `prefix_len` tokens of every member; its first
    `shared_len` tokens are whole KV blocks). A plain row has node -1 and prefix_len 0."""

    id: int
    prefix_len: int
    shared_len: int
    node: int
    rows: np.ndarray
    keys: np.ndarray


@dataclass(frozen=True)
class PrefixPlan:
    """The full plan. Row indices are input positions 0..n-1; keys[i] is row i's key.

    row_order: row indices in the order the scheduler should run them (a permutation).
    groups: our groups in run order (rows = row indices; consecutive in row_order).
    batchllm: BatchLLM's groups in sorted order (rows = row indices).
    """

    keys: np.ndarray
    lengths: np.ndarray
    sorted: SortedSequences
    trie: PrefixTrie
    row_order: np.ndarray
    groups: GroupTable
    batchllm: GroupTable
    batchllm_prefill_tokens: int
    decode_saved_reads: int
    block_size: int
    max_tokens: int
    lru: LruResult | None = None
    kv_cache_tokens: int | None = None
    prompt_tokens: int = field(init=False)
    unique_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_tokens", int(self.lengths.sum()))
        object.__setattr__(self, "unique_prompt_tokens", int(self.trie.span.sum()))

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def plan_prefill_tokens(self) -> int:
        # Every trie node is computed exactly once; a row ending inside a node's span reads its
        # logits from that node's prefill, so nothing is recomputed.
        return self.unique_prompt_tokens

    @property
    def key_order(self) -> np.ndarray:
        return self.keys[self.row_order]

    def iter_groups(self, batchllm: bool = False) -> Iterator[PlanGroup]:
        """Our groups in run order (or BatchLLM's, in sorted order)."""
        table = self.batchllm if batchllm else self.groups
        for k in range(table.num_groups):
            rows = table.members(k)
            yield PlanGroup(
                id=k,
                prefix_len=int(table.prefix_len[k]),
                shared_len=int(table.shared_len[k]),
                node=int(table.node[k]),
                rows=rows,
                keys=self.keys[rows],
            )

    def _key(self, row: int) -> Hashable:
        k = self.keys[row]
        return k.item() if isinstance(k, np.generic) else k

    def report(self, top_k: int = 10, max_nodes: int = 200) -> PrefixPlanReport:
        trie, order = self.trie, self.sorted.order
        rows = trie.rows
        saved = (rows - 1) * trie.depth_end
        cand = np.nonzero((rows >= 2) & (trie.depth_end > 0))[0]
        cand = cand[np.lexsort((cand, -saved[cand]))][:top_k]
        top = tuple(
            SharedPrefix(
                node=int(v),
                row=int(order[trie.lo[v]]),
                key=self._key(int(order[trie.lo[v]])),
                sorted_index=int(trie.lo[v]),
                length=int(trie.depth_end[v]),
                rows=int(rows[v]),
                saved_tokens=int(saved[v]),
            )
            for v in cand
        )
        # Largest nodes by rows; an ancestor has at least its descendants' rows and is shallower,
        # so ranking by (rows desc, depth asc) keeps every kept node's parent.
        keep = np.lexsort((trie.depth_end, -rows))[:max_nodes]
        keep = np.sort(keep)
        icicle = tuple(
            IcicleNode(
                node=int(v),
                parent=int(trie.parent[v]),
                depth_start=int(trie.depth_start[v]),
                depth_end=int(trie.depth_end[v]),
                rows=int(rows[v]),
                row=int(order[trie.lo[v]]) if rows[v] else -1,
                key=self._key(int(order[trie.lo[v]])) if rows[v] else None,
            )
            for v in keep
        )
        prompt = self.prompt_tokens
        return PrefixPlanReport(
            rows=self.rows,
            prompt_tokens=prompt,
            unique_prompt_tokens=self.unique_prompt_tokens,
            sharing_ratio=(1.0 - self.unique_prompt_tokens / prompt) if prompt else 0.0,
            block_size=self.block_size,
            kv_cache_tokens=self.kv_cache_tokens,
            plan_prefill_tokens=self.plan_prefill_tokens,
            batchllm_prefill_tokens=self.batchllm_prefill_tokens,
            lru_prefill_tokens=None if self.lru is None else self.lru.computed_tokens,
            groups=GroupSizeStats.of(self.groups),
            batchllm_groups=GroupSizeStats.of(self.batchllm),
            decode_saved_reads=self.decode_saved_reads,
            top_prefixes=top,
            icicle=icicle,
        )


def _as_keys(keys: Sequence[Hashable] | np.ndarray | None, n: int) -> np.ndarray:
    if keys is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(keys)
    if arr.ndim != 1:  # e.g. tuples as keys: keep them as Python objects
        arr = np.empty(len(keys), dtype=object)
        arr[:] = list(keys)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} keys for {n} sequences.")
    return arr


def plan_from_sorted(
    lengths: np.ndarray,
    srt: SortedSequences,
    trie: PrefixTrie,
    *,
    keys: np.ndarray,
    block_size: int,
    max_tokens: int,
    lru: LruResult | None,
    kv_cache_tokens: int | None,
) -> PrefixPlan:
    """Groups and order from a sorted set and its trie (shared by the in-memory and streaming paths)."""
    order = srt.order
    lengths_sorted = lengths[order]
    bl = batchllm_groups(trie, lengths_sorted, block_size)
    dg = decode_groups(trie, block_size)
    sequence = plan_order(trie, dg, max_tokens)
    ours = decode_group_table(trie, dg, sequence, block_size)
    return PrefixPlan(
        keys=keys,
        lengths=lengths,
        sorted=srt,
        trie=trie,
        row_order=order[sequence],
        groups=ours.map_rows(order),
        batchllm=bl.groups.map_rows(order),
        batchllm_prefill_tokens=bl.prefill_tokens,
        decode_saved_reads=dg.saved_reads,
        block_size=block_size,
        max_tokens=max_tokens,
        lru=lru,
        kv_cache_tokens=kv_cache_tokens,
    )


def _check(block_size: int, max_tokens: int) -> None:
    if block_size < 1:
        raise ValueError("block_size must be positive.")
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive.")


def plan_prefixes(
    seqs: PackedSequences,
    *,
    keys: Sequence[Hashable] | np.ndarray | None = None,
    block_size: int = 16,
    kv_cache_tokens: int | None = None,
    max_tokens: int = 256,
    simulate_lru: bool = True,
) -> PrefixPlan:
    """Plan `seqs` (row i = sequence i, in table order) in memory.

    kv_cache_tokens: KV cache size for the LRU comparison (None = unbounded).
    max_tokens: expected decode length per row, for the decode/prefill ordering heuristic.
    """
    _check(block_size, max_tokens)
    key_arr = _as_keys(keys, seqs.n)
    srt = sort_sequences(seqs)
    builder = TrieBuilder()
    builder.feed(seqs.lengths[srt.order], srt.lcp)
    trie = builder.finish()
    lru = None
    if simulate_lru:
        sim = LruPrefixCache(block_size, kv_cache_tokens)
        sim.feed(seqs)
        lru = sim.result()
    return plan_from_sorted(
        seqs.lengths,
        srt,
        trie,
        keys=key_arr,
        block_size=block_size,
        max_tokens=max_tokens,
        lru=lru,
        kv_cache_tokens=kv_cache_tokens,
    )


class SortedStreamPlanner:
    """Consumes sorted batches (row indices + their sequences, in sorted order), computing neighbour
    LCPs across batch boundaries and feeding the trie builder; only O(rows) state is kept."""

    def __init__(self) -> None:
        self._builder = TrieBuilder()
        self._rows: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self._lcps: list[np.ndarray] = []
        self._last: PackedSequences | None = None

    def feed(self, rows: np.ndarray, batch: PackedSequences) -> None:
        if batch.n == 0:
            return
        lcp = neighbor_lcp(batch)
        if self._last is not None:
            lcp[0] = pair_lcp(
                self._last.tokens, self._last.offsets, np.zeros(1, np.int64),
                batch.tokens, batch.offsets, np.zeros(1, np.int64),
            )[0]
        self._last = batch.take(np.array([batch.n - 1]))
        lengths = batch.lengths
        self._builder.feed(lengths, lcp)
        self._rows.append(np.asarray(rows, dtype=np.int64))
        self._lens.append(lengths)
        self._lcps.append(lcp)

    def finish(self) -> tuple[SortedSequences, np.ndarray, PrefixTrie]:
        """(sorted order + LCPs, lengths in sorted order, trie)."""
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        srt = SortedSequences(cat(self._rows), cat(self._lcps))
        return srt, cat(self._lens), self._builder.finish()


def plan_prefixes_from_sorted_stream(
    sorted_batches: Iterable[tuple[np.ndarray, PackedSequences]],
    *,
    keys: Sequence[Hashable] | np.ndarray | None = None,
    block_size: int = 16,
    max_tokens: int = 256,
    lru: LruResult | None = None,
    kv_cache_tokens: int | None = None,
) -> PrefixPlan:
    """Plan from (row indices, sequences) batches that arrive in sorted order (any batch sizes)."""
    _check(block_size, max_tokens)
    planner = SortedStreamPlanner()
    for rows, batch in sorted_batches:
        planner.feed(rows, batch)
    srt, lengths_sorted, trie = planner.finish()
    n = len(srt.order)
    if not np.array_equal(np.sort(srt.order), np.arange(n)):
        raise ValueError("sorted batches must cover rows 0..n-1 exactly once.")
    lengths = np.empty(n, dtype=np.int64)
    lengths[srt.order] = lengths_sorted
    return plan_from_sorted(
        lengths,
        srt,
        trie,
        keys=_as_keys(keys, n),
        block_size=block_size,
        max_tokens=max_tokens,
        lru=lru,
        kv_cache_tokens=kv_cache_tokens,
    )


def plan_prefixes_out_of_core(
    batches: Iterable[PackedSequences],
    *,
    keys: Sequence[Hashable] | np.ndarray | None = None,
    block_size: int = 16,
    kv_cache_tokens: int | None = None,
    max_tokens: int = 256,
    simulate_lru: bool = True,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
    threads: int | None = None,
    sort_batch_rows: int = 65536,
) -> PrefixPlan:
    """Plan batches (in table order) whose tokens need not fit in memory together.

    One pass over `batches` feeds DuckDB (which sorts, spilling to `temp_directory` beyond
    `memory_limit`, using `threads` threads) and the LRU simulation; the sorted result streams back
    through the trie builder. Memory: O(rows) for the plan, plus one batch of tokens at a time.
    """
    from engine.prefix_sort_duckdb import sort_sequences_out_of_core  # the only DuckDB user

    _check(block_size, max_tokens)
    sim = LruPrefixCache(block_size, kv_cache_tokens) if simulate_lru else None

    def table_order() -> Iterator[PackedSequences]:
        for batch in batches:
            if sim is not None:
                sim.feed(batch)
            yield batch

    sorted_batches = sort_sequences_out_of_core(
        table_order(),
        memory_limit=memory_limit,
        temp_directory=temp_directory,
        threads=threads,
        batch_rows=sort_batch_rows,
    )
    return plan_prefixes_from_sorted_stream(
        sorted_batches,
        keys=keys,
        block_size=block_size,
        max_tokens=max_tokens,
        lru=None if sim is None else sim.result(),
        kv_cache_tokens=kv_cache_tokens,
    )
