"""The prefix plan of a whole input and the numbers `batchllm analyze` reports, all read off the
one execution plan `run` follows (execution_plan.py), plus simulated baselines for comparison.

Input is token ids and row keys only (no tables): the CLI tokenizes, calls `plan_prefixes` (in
memory) or sorts out of core itself and calls `plan_prefixes_from_sorted_stream`, decodes the token
spans named in the report back to text and renders them.

Pipeline (see DESIGN.md "The prefix plan"):
  sort + neighbour LCP (sort.py in memory; out of core the CLI's DuckDB sort streams sorted batches)
  -> compact trie, one streaming pass (trie.py)
  -> execution plan: shared prefixes, run order, decode groups (execution_plan.py)
  -> baselines: BatchLLM's single-level groups (batchllm_baseline.py) and an LRU prefix cache in
     table order (lru_simulation.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import numpy as np

from engine.planning.batchllm_baseline import GroupTable, batchllm_groups
from engine.planning.execution_plan import DecodeGroups, ExecutionPlan, build_execution_plan, decode_groups
from engine.planning.lru_simulation import LruPrefixCache, LruResult
from engine.planning.packed import PackedSequences, neighbor_lcp, pair_lcp
from engine.planning.sort import SortedSequences, sort_sequences
from engine.planning.trie import PrefixTrie, TrieBuilder


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
    def of(cls, sizes: np.ndarray, shared_len: np.ndarray, rows: int) -> "GroupSizeStats":
        """From group sizes and shared lengths (plain rows may be listed as groups of one or left out)."""
        shared = sizes[(shared_len > 0) & (sizes >= 2)]
        hist: list[tuple[int, int, int]] = []
        if len(shared):
            bucket = np.floor(np.log2(shared)).astype(np.int64)
            for b, c in zip(*np.unique(bucket, return_counts=True)):
                hist.append((1 << int(b), (1 << (int(b) + 1)) - 1, int(c)))
        return cls(
            shared_groups=int(len(shared)),
            rows_in_shared_groups=int(shared.sum()),
            plain_rows=int(rows - shared.sum()),
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
    plan_prefill_tokens: int  # what the execution plan computes: every trie node once
    batchllm_prefill_tokens: int  # BatchLLM single-level, block-aligned prefixes
    lru_prefill_tokens: int | None  # LRU prefix cache of kv_cache_tokens, table order
    groups: GroupSizeStats  # the decode groups `run` forms
    batchllm_groups: GroupSizeStats
    decode_saved_reads: int  # prefix KV token reads one decode step saves when each group decodes together
    top_prefixes: tuple[SharedPrefix, ...]
    icicle: tuple[IcicleNode, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (keys are passed through as they are)."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class PrefixPlan:
    """The execution plan `run` follows plus what `analyze` compares it with. Row indices are input
    positions 0..n-1; keys[i] is row i's key.

    execution: the plan (shared prefixes, run order, start prefixes), built from `sorted`'s trie.
    groups: the decode groups the model runner forms for it (row indices, run order).
    batchllm: BatchLLM's groups in sorted order (rows = row indices), simulated for comparison.
    """

    keys: np.ndarray
    sorted: SortedSequences
    execution: ExecutionPlan
    groups: DecodeGroups
    batchllm: GroupTable
    batchllm_prefill_tokens: int
    block_size: int
    max_tokens: int
    lru: LruResult | None = None
    kv_cache_tokens: int | None = None

    @property
    def trie(self) -> PrefixTrie:
        return self.execution.trie

    @property
    def lengths(self) -> np.ndarray:
        return self.execution.lengths

    @property
    def rows(self) -> int:
        return self.execution.rows

    @property
    def prompt_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def unique_prompt_tokens(self) -> int:
        return self.execution.unique_prompt_tokens

    @property
    def plan_prefill_tokens(self) -> int:
        return self.execution.prefill_tokens

    @property
    def row_order(self) -> np.ndarray:
        return self.execution.row_order

    @property
    def decode_saved_reads(self) -> int:
        return self.groups.saved_reads

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
            groups=GroupSizeStats.of(self.groups.sizes, self.groups.shared_len, self.rows),
            batchllm_groups=GroupSizeStats.of(self.batchllm.sizes, self.batchllm.shared_len, self.rows),
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
    """The plan from a sorted set and its trie (shared by the in-memory and streaming paths)."""
    order = srt.order
    execution = build_execution_plan(trie, order, lengths, max_tokens)
    bl = batchllm_groups(trie, lengths[order], block_size)
    return PrefixPlan(
        keys=keys,
        sorted=srt,
        execution=execution,
        groups=decode_groups(execution, block_size),
        batchllm=bl.groups.map_rows(order),
        batchllm_prefill_tokens=bl.prefill_tokens,
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
