"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference counts.

The scheduler talks to it in check-then-commit pairs (`can_grow` then `grow`), so a decision is never
half applied. Blocks are reference-counted so a prefix's blocks can be shared by many sequences; a
shared partial block is copied on write (the copy is queued for the model runner).

With `prefix_cache=True` it also behaves like an online engine's automatic prefix cache (the `lru`
sharing mode): full blocks are named by a hash chained over their tokens, a freed block keeps its
content and name until it is reused, and free blocks are reused least recently freed first. Without
it (plan and none) the most recently freed block is reused first: a run then touches only as many
blocks as it ever held at once, and an untouched page of a CPU KV cache costs no RAM (handing out the
least recently freed one walked through the whole cache: a job peaking at 457 blocks grew to the
default budget's 2.4 GB).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence as Seq

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # A freed block goes to the back. lru: reuse from the front (least recently freed, its cached
        # content kept longest); otherwise from the back, lowest ids first at the start.
        self._reuse_last_freed = not prefix_cache
        order = reversed(range(num_blocks)) if self._reuse_last_freed else range(num_blocks)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(order)
        self.peak_used_blocks = 0
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies before the next step
        self.prefix_cache = prefix_cache
        self._block_by_hash: dict[int, int] = {}
        self._content: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # block -> (hash, parent hash, tokens)

    # -- capacity -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def new_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens in total."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(seq.block_table))

    def holds(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq`'s blocks already hold `num_tokens` tokens (no growth needed)."""
        return num_tokens <= len(seq.block_table) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.new_blocks_needed(seq, num_tokens) <= len(self._free)

    # -- allocation -----------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=self._reuse_last_freed)
        self._forget(block)
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def _note_peak(self) -> None:
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.new_blocks_needed(seq, num_tokens)
        assert needed <= len(self._free), "grow() without a successful can_grow()"
        seq.block_table.extend(self._take_free_block() for _ in range(needed))
        self._note_peak()

    def acquire(self, blocks: Seq[int]) -> None:
        """Take a reference on blocks (shared or cached); a cached free block leaves the free list."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        self._note_peak()

    def release(self, blocks: Seq[int]) -> None:
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if not self.prefix_cache:
                    self._forget(block)

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    # -- sharing a prefix -----------------------------------------------------------------------
    def blocks_to_share(self, prefix_blocks: Seq[int], prefix_len: int) -> int:
        """New blocks a sequence needs to start on a computed prefix: one for a partial last block."""
        return 1 if prefix_len % self.block_size else 0

    def start_on_prefix(self, seq: Sequence, prefix_blocks: Seq[int], prefix_len: int) -> None:
        """Make `seq` begin with a computed prefix of `prefix_len` tokens: full blocks are shared,
        a partial last block is copied on write (queued in `pending_copies`)."""
        assert not seq.block_table and self.blocks_for_tokens(prefix_len) == len(prefix_blocks)
        full = prefix_len // self.block_size
        self.acquire(prefix_blocks[:full])
        seq.block_table = list(prefix_blocks[:full])
        if full < len(prefix_blocks):
            assert self._free, "start_on_prefix() without room for the copied block"
            copy = self._take_free_block()
            self.pending_copies.append((prefix_blocks[full], copy))
            seq.block_table.append(copy)
            self._note_peak()

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- automatic prefix cache (lru mode) --------------------------------------------------------
    def _forget(self, block: int) -> None:
        content = self._content.pop(block, None)
        if content is not None and self._block_by_hash.get(content[0]) == block:
            del self._block_by_hash[content[0]]

    def _hash_chain(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of `seq`'s first `num_blocks` full blocks (at least). They are kept on
        the sequence and extended here, so filling block k hashes block_size tokens, not k of them."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(block_hash(hashes[i - 1] if i else 0, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes

    def _block_entry(self, seq: Sequence, i: int) -> tuple[int, int, tuple[int, ...]]:
        """(hash, parent hash, tokens) of block i: what `_content` keeps to tell a hash collision."""
        hashes, bs = seq.block_hashes, self.block_size
        return hashes[i], hashes[i - 1] if i else 0, tuple(seq.token_ids[i * bs : (i + 1) * bs])

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest run of leading full blocks of `seq`, leaving at least
        the last token to compute (its logits are needed)."""
        if not self.prefix_cache:
            return []
        hits: list[int] = []
        num_blocks = (len(seq) - 1) // self.block_size
        for i, h in enumerate(self._hash_chain(seq, num_blocks)[:num_blocks]):
            block = self._block_by_hash.get(h)
            # a hash collision is a miss
            if block is None or self._content.get(block) != self._block_entry(seq, i):
                break
            hits.append(block)
        return hits

    def register_full_blocks(self, seq: Sequence) -> None:
        """Name the sequence's newly computed full blocks so later sequences can hit them."""
        if not self.prefix_cache:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hash_chain(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = seq.block_table[i]
            if hashes[i] not in self._block_by_hash and block not in self._content:
                self._content[block] = self._block_entry(seq, i)
                self._block_by_hash[hashes[i]] = block
        seq.num_registered_blocks = num_full


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The name of a full block: its tokens, chained to the name of the block before it (0 first)."""
    return hash((parent, tokens))
