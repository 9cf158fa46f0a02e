"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference counts.

The scheduler talks to it in check-then-commit pairs (`can_grow` then `grow`), so a decision is never
half applied. Blocks are reference-counted so that a prefix's blocks can be shared by many sequences.
"""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used_blocks = 0

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

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.new_blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.new_blocks_needed(seq, num_tokens)
        assert needed <= len(self._free), "grow() without a successful can_grow()"
        for _ in range(needed):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq`'s table with blocks another owner already holds (a shared prefix)."""
        assert not seq.block_table
        for block in blocks:
            assert self.ref_counts[block] > 0
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []
