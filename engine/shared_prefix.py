"""Run-time state of one shared prefix: computed once, pinned until every dependent has its own
references to the blocks, then released (explicit lifetime, no LRU guessing)."""
from __future__ import annotations

import torch

from engine.sequence import Sequence


class SharedPrefixState:
    def __init__(self, prefix_id: int, seq: Sequence, num_dependents: int, keeps_logits: bool) -> None:
        self.prefix_id = prefix_id
        self.keeps_logits = keeps_logits
        self.logits: torch.Tensor | None = None  # [vocab] float32 at the last position, if kept
        self.seq = seq  # a prefill-only sequence over the prefix tokens
        self.dependents_left = num_dependents  # dependents not yet holding their own references
        self.ready = False  # all its KV is computed
        self.released = False  # its pin is gone; dependents not yet started recompute from scratch

    @property
    def length(self) -> int:
        return len(self.seq)

    @property
    def blocks(self) -> list[int]:
        return self.seq.block_table
