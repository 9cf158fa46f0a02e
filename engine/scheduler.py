"""Continuous batching with chunked prefill.

Each step is one flat batch of tokens: first one decode token for every running sequence, then the
next chunks of sequences still in prefill, then new sequences, up to the token budget. Admission is
bounded by KV blocks (a sequence is admitted only when its whole current length fits); when decode
growth runs out of blocks, the newest sequence is preempted and recomputed later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of this chunk that are prompt (or recomputed) tokens rather than a decode."""
        return max(0, min(self.start + self.num_tokens, self.seq.prefill_len) - self.start)

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so its last position yields a new token."""
        return self.start + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_num_seqs: int) -> None:
        self.block_manager = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the newest is last
        self.num_preemptions = 0
        # Free blocks kept back when admitting, so running sequences can grow a while before
        # anything must be preempted.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        # decodes (one token each) go first, then prefill continuations
        for decode_pass in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    return chunks
                if seq.status is not SequenceStatus.RUNNING or (seq.num_uncomputed_tokens == 1) != decode_pass:
                    continue
                num = min(seq.num_uncomputed_tokens, budget)
                if decode_pass:
                    if not self._make_room(seq, seq.num_computed_tokens + num):
                        continue
                else:
                    # admission reserved blocks for the whole prompt, so a prefill never preempts
                    # (a victim could be a decode already scheduled in this step)
                    assert self.block_manager.new_blocks_needed(seq, seq.num_computed_tokens + num) == 0
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
                budget -= num
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            reserve = self.watermark_blocks if self.running else 0
            if self.block_manager.new_blocks_needed(seq, len(seq)) + reserve > self.block_manager.num_free_blocks:
                break  # first come, first served: never let a later, smaller row jump the queue
            self.waiting.popleft()
            self.block_manager.grow(seq, len(seq))
            seq.status = SequenceStatus.RUNNING
            seq.prefill_len = len(seq)
            self.running.append(seq)
            num = min(len(seq), budget)
            chunks.append(ScheduledChunk(seq, 0, num))
            budget -= num
        return chunks

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt newest sequences until `seq` can hold `num_tokens`; False if `seq` itself went."""
        while not self.block_manager.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.block_manager.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def commit(self, chunks: list[ScheduledChunk]) -> None:
        """The forward pass wrote these chunks' K/V into the cache."""
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
