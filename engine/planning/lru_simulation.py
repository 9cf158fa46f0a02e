"""What a vLLM-style automatic prefix cache (LRU) would prefill, for comparison with the plan.

Model (vLLM v1 automatic prefix caching, simplified to one request at a time):
- Only full blocks of `block_size` tokens are cached; a block is identified by a chained hash of
  (parent block's hash, its tokens), so equal blocks at equal prefixes hit, nothing else does.
- Requests arrive in the given order (table order by default) and run one at a time.
- A request's hit is its longest run of leading blocks found in the cache, counted over at most
  the first len-1 tokens: when the whole prompt is cached vLLM still recomputes the last token to
  get logits, and at block granularity that means the whole last block (vLLM v1's
  `max_cache_hit_length = prompt_len - 1`). Computed tokens = len - hit; an empty prompt costs 0.
- After the request, all its full blocks are cached and most recently used, freed tail first like
  vLLM v1's `KVCacheManager.free`, so a request's first block is evicted last.
- The cache holds `kv_cache_tokens // block_size` blocks; the least recently used are evicted.
  Running requests and their decode tokens take no space here (one request at a time), which
  favours LRU: a real server with many requests in flight has less room for cached blocks.
- Hash collisions (64-bit) are ignored: ~1e-5 chance of one among 20M blocks.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import repeat, starmap, takewhile

import numpy as np

from engine.planning.packed import PackedSequences, token_windows

_U64 = np.uint64
_SEED = _U64(0x243F6A8885A308D3)
_MUL = _U64(0x9E3779B97F4A7C15)
_BLOCKS_PER_CHUNK = 1 << 18
_ROWS_PER_CHUNK = 1 << 16
_consume = deque(maxlen=0).extend  # runs an iterator to its end at C speed


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _token_keys(block_size: int) -> np.ndarray:
    # Fixed odd multipliers per position in a block (multilinear hash of the block's tokens).
    rng = np.random.default_rng(0x5EED)
    return rng.integers(0, np.iinfo(np.int64).max, size=block_size, dtype=np.int64).astype(_U64) | _U64(1)


def block_hashes(seqs: PackedSequences, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Chained hashes of every full block of every sequence.

    Returns (hashes uint64 (total_blocks,), block_offsets int64 (n+1,)): the blocks of sequence i
    are hashes[block_offsets[i]:block_offsets[i+1]], in order; hash j covers the first (j+1)*block_size
    tokens (it chains the hash of block j-1).
    """
    if block_size < 1:
        raise ValueError("block_size must be positive.")
    nb = seqs.lengths // block_size
    boff = np.zeros(seqs.n + 1, dtype=np.int64)
    np.cumsum(nb, out=boff[1:])
    total = int(boff[-1])
    content = np.empty(total, dtype=_U64)
    if total:
        # An even block of int32 tokens is read as half as many 64-bit words (no conversion pass);
        # all blocks have the same length, so raw words (zeros included) identify the tokens.
        paired = block_size % 2 == 0
        keys = _token_keys(block_size // 2 if paired else block_size)
        block_row = np.repeat(np.arange(seqs.n, dtype=np.int64), nb)
        for c in range(0, total, _BLOCKS_PER_CHUNK):
            ids = np.arange(c, min(c + _BLOCKS_PER_CHUNK, total), dtype=np.int64)
            r = block_row[ids]
            starts = seqs.offsets[r] + (ids - boff[r]) * block_size
            win = token_windows(seqs.tokens, starts, block_size)
            words = win.view(_U64) if paired else win.astype(_U64)
            content[ids] = _splitmix((words * keys[None, :]).sum(axis=1, dtype=_U64))
    hashes = np.empty(total, dtype=_U64)
    # Chain along each sequence, vectorized across sequences: step j handles every j-th block.
    first = boff[:-1]
    prev = np.full(seqs.n, _SEED, dtype=_U64)
    j = 0
    alive = np.nonzero(nb > 0)[0]
    while len(alive):
        idx = first[alive] + j
        h = _splitmix(prev[alive] * _MUL + content[idx])
        hashes[idx] = h
        prev[alive] = h
        j += 1
        alive = alive[nb[alive] > j]
    return hashes, boff


@dataclass(frozen=True)
class LruResult:
    prompt_tokens: int
    computed_tokens: int  # prefill tokens the LRU cache would compute
    hit_tokens: int


class LruPrefixCache:
    """Streaming simulation: feed batches of requests in arrival order, read `result()`.

    kv_cache_tokens=None means unbounded (nothing is ever evicted).
    """

    def __init__(self, block_size: int, kv_cache_tokens: int | None) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive.")
        self.block_size = block_size
        self.capacity = None if kv_cache_tokens is None else max(0, kv_cache_tokens // block_size)
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._seen = np.zeros(0, dtype=_U64)  # unbounded mode: sorted hashes seen so far
        self._prompt = 0
        self._hit = 0

    def feed(self, seqs: PackedSequences) -> None:
        """Requests of `seqs` arrive in order, after everything fed before."""
        if self.capacity is None:
            self._feed_chunk(seqs)
            return
        # The exact LRU walk holds Python ints per block: bound that memory by walking in chunks.
        for start in range(0, seqs.n, _ROWS_PER_CHUNK):
            self._feed_chunk(seqs.slice(start, min(start + _ROWS_PER_CHUNK, seqs.n)))

    def _feed_chunk(self, seqs: PackedSequences) -> None:
        lengths = seqs.lengths
        self._prompt += int(lengths.sum())
        hashes, boff = block_hashes(seqs, self.block_size)
        # Blocks a request may hit: those inside its first len-1 tokens.
        limit = np.where(lengths > 0, (lengths - 1) // self.block_size, 0)
        if self.capacity is None:
            self._hit += self._feed_unbounded(hashes, boff, limit)
        else:
            self._hit += self._feed_lru(hashes, boff, limit)

    def _feed_unbounded(self, hashes: np.ndarray, boff: np.ndarray, limit: np.ndarray) -> int:
        """A block hits iff an earlier request had it: vectorized, no per-block Python work."""
        if len(hashes) == 0:
            return 0
        # Earlier in this batch: any occurrence after the first. (The same hash twice in one
        # request is impossible: block j's hash chains the j blocks before it.)
        by_hash = np.argsort(hashes)
        srt = hashes[by_hash]
        run_start = np.ones(len(srt), dtype=bool)
        run_start[1:] = srt[1:] != srt[:-1]
        starts = np.nonzero(run_start)[0]
        first_of_run = np.minimum.reduceat(by_hash, starts)
        seen_before = np.empty(len(hashes), dtype=bool)
        seen_before[by_hash] = by_hash > np.repeat(first_of_run, np.diff(np.append(starts, len(srt))))
        uniq = srt[starts]
        if len(self._seen):
            at = np.minimum(np.searchsorted(self._seen, hashes), len(self._seen) - 1)
            seen_before |= self._seen[at] == hashes
            merged = np.sort(np.concatenate([self._seen, uniq]))
            keep = np.ones(len(merged), dtype=bool)
            keep[1:] = merged[1:] != merged[:-1]
            self._seen = merged[keep]
        else:
            self._seen = uniq
        row = np.repeat(np.arange(len(boff) - 1), np.diff(boff))
        j = np.arange(len(hashes)) - boff[row]
        # Leading run: a block counts if it and every block before it (in the hit window) is cached.
        miss = ~seen_before | (j >= limit[row])
        first_miss = np.full(len(boff) - 1, 0, dtype=np.int64)
        nb = np.diff(boff)
        first_miss[:] = np.minimum(nb, limit)
        miss_idx = np.nonzero(miss)[0]
        if len(miss_idx):
            # The earliest miss of each row (miss_idx is sorted, rows are contiguous).
            rows_with_miss, pos = np.unique(row[miss_idx], return_index=True)
            first_miss[rows_with_miss] = np.minimum(first_miss[rows_with_miss], j[miss_idx[pos]])
        return int(first_miss.sum()) * self.block_size

    def _feed_lru(self, hashes: np.ndarray, boff: np.ndarray, limit: np.ndarray) -> int:
        """Exact LRU walk, one request at a time. Per request a handful of C-level bulk calls
        (itertools/map over the OrderedDict's methods) replace per-block Python statements."""
        lru = self._lru
        cap = self.capacity
        cached = lru.__contains__
        drop = lru.pop
        append = lru.update
        evict = lru.popitem
        hs = hashes.tolist()
        bounds = boff.tolist()
        hit_blocks = 0
        none = repeat(None)
        for r, lim in enumerate(limit.tolist()):
            a, b = bounds[r], bounds[r + 1]
            if lim:
                hit_blocks += len(list(takewhile(cached, hs[a : a + lim])))
            blocks = hs[a:b]
            # Tail first, so the request's first block ends up most recently used: drop the blocks
            # from wherever they are, then append them in that order.
            blocks.reverse()
            _consume(map(drop, blocks, none))
            append(zip(blocks, none))
            excess = len(lru) - cap
            if excess > 0:
                _consume(starmap(evict, repeat((False,), excess)))
        return hit_blocks * self.block_size

    def result(self) -> LruResult:
        return LruResult(self._prompt, self._prompt - self._hit, self._hit)


def lru_prefill_tokens(seqs: PackedSequences, block_size: int, kv_cache_tokens: int | None) -> int:
    """Prefill tokens an LRU prefix cache computes for `seqs` arriving in the given order."""
    sim = LruPrefixCache(block_size, kv_cache_tokens)
    sim.feed(seqs)
    return sim.result().computed_tokens
