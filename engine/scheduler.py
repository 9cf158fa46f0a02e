"""Continuous batching with chunked prefill, shared prefixes and memory-centric admission.

Each step is one flat batch of tokens: one decode token for every running row, then the next
chunks of sequences still in prefill, then newly admitted work, up to the token budget. Admission
is bounded by KV blocks, not a sequence count: an item is admitted when its own blocks plus its
reserved decode growth fit next to the growth already reserved for running rows. When growth
runs out of blocks anyway, the newest sequence is preempted and recomputed later; computed shared
prefixes stay pinned until their dependents hold their own references.

Decode growth is reserved up to a row's max tokens until LENGTH_SAMPLES rows have finished; from then
on (`learn_lengths`) up to the length LENGTH_QUANTILE of the finished rows' answers stayed within,
when that is shorter: a job whose answers stop at a few tokens under a generous --max-tokens
(classification, extraction) no longer holds max-tokens blocks per row it will never use, so more
rows run at once. A row that passes that length reserves up to its max tokens again (admission
then waits for the room), so only rows already admitted can run short of blocks, and those
preempt the newest row, as when reservation is off.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.shared_prefix import SharedPrefixState

# waiting items looked at per step past ones blocked on a prefix still in prefill
_ADMISSION_LOOKAHEAD = 64
# finished rows before their answers' lengths bound the decode growth reserved for others, and
# the share of them whose length the reservation covers
LENGTH_SAMPLES = 32
LENGTH_QUANTILE = 0.95


class ScheduledChunk(NamedTuple):
    """One sequence's tokens in a step. Immutable; what the step does with it is decided when it is
    scheduled (`of`): each step reads these flags several times per row, and a tuple built once
    costs less than a property evaluated at every read."""

    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int
    # tokens of the chunk that are prompt (or recomputed) tokens rather than a decode
    num_prefill_tokens: int
    # the chunk reaches the end of a row, so a new token is drawn (from this step's logits, or, for a
    # zero-token chunk of a row ending at a shared prefix, from the prefix's)
    samples: bool
    # the chunk completes a shared prefix whose last logits rows ending there will use
    keeps_logits: bool

    @classmethod
    def of(cls, seq: Sequence, start: int, num_tokens: int) -> ScheduledChunk:
        end = start + num_tokens
        prefill = seq.prefill_len
        reaches_end = end == len(seq.token_ids)
        state = seq.prefix_state
        return cls(seq, start, num_tokens, (min(end, prefill) - start) if start < prefill else 0,
                   reaches_end and not seq.is_prefix,
                   reaches_end and seq.is_prefix and state is not None and state.keeps_logits)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_tokens: int,
        max_num_seqs: int,
        decode_reservation: float = 1.0,
        learn_lengths: bool = True,
    ) -> None:
        self.block_manager = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.decode_reservation = decode_reservation
        self.learn_lengths = learn_lengths
        self.rows_finished = 0
        self._answer_lengths: Counter[int] = Counter()  # completion tokens -> rows finished with them
        self.typical_completion: int | None = None  # LENGTH_QUANTILE of them (tokens), once there are enough
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the newest is last
        self.pinned: list[SharedPrefixState] = []  # computed prefixes still holding their blocks
        self.num_preemptions = 0
        self.num_sharing_fallbacks = 0
        self.prefix_hit_tokens = 0
        self._drop_logits_after_step: list[SharedPrefixState] = []

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_before(self, seq: Sequence, waiting: Sequence) -> None:
        """Queue `seq` just ahead of the waiting sequence `waiting` (a prefix it now starts on)."""
        assert seq.status is SequenceStatus.WAITING
        self.waiting.insert(self.waiting.index(waiting), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step -------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self._schedule_running(chunks, self.max_batch_tokens)
        budget = self._admit(chunks, budget)
        while not chunks and not self.running and self.waiting:
            # Nothing runs and nothing fits: pinned prefixes hold the memory the next item needs.
            dissolved = self._dissolve_newest_pinned()  # not inside the assert: python -O drops asserts
            assert dissolved, "no schedulable work although requests are pending"
            self._admit(chunks, budget)
        return chunks

    def _schedule_running(self, chunks: list[ScheduledChunk], budget: int) -> int:
        # decodes (one token each) go first, then prefill continuations
        prefills: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                return 0
            if seq.status is not SequenceStatus.RUNNING:  # preempted by an earlier row's growth
                continue
            if seq.num_uncomputed_tokens != 1:
                prefills.append(seq)
            elif self._make_room(seq, seq.num_computed_tokens + 1):
                chunks.append(ScheduledChunk.of(seq, seq.num_computed_tokens, 1))
                budget -= 1
        for seq in prefills:
            if budget == 0:
                return 0
            if seq.status is not SequenceStatus.RUNNING:
                continue
            num = min(seq.num_uncomputed_tokens, budget)
            # admission gave the whole sequence its blocks, so a prefill never preempts
            # (a victim could be a decode already scheduled in this step)
            assert self.block_manager.new_blocks_needed(seq, seq.num_computed_tokens + num) == 0
            chunks.append(ScheduledChunk.of(seq, seq.num_computed_tokens, num))
            budget -= num
        return budget

    def _reserved_growth(self) -> int:
        return sum(self._growth_blocks(seq, len(seq.block_table)) for seq in self.running)

    def expected_completion(self, seq: Sequence) -> int:
        """Completion tokens admission reserves room for (see the module's note): max tokens, or the
        finished rows' typical answer length while this row is still within it."""
        typical = self.typical_completion
        if typical is not None and seq.num_completion_tokens < typical:
            return min(seq.max_tokens, typical)
        return seq.max_tokens

    def _learn_length(self, tokens: int) -> None:
        self.rows_finished += 1
        if not self.learn_lengths:
            return
        self._answer_lengths[tokens] += 1
        n = self.rows_finished
        # recounted at LENGTH_SAMPLES rows, then as the count doubles and every 1024 rows
        if n >= LENGTH_SAMPLES and ((n & (n - 1)) == 0 or n % 1024 == 0 or self.typical_completion is None):
            covered, need = 0, LENGTH_QUANTILE * n
            for length in sorted(self._answer_lengths):
                covered += self._answer_lengths[length]
                if covered >= need:
                    self.typical_completion = max(1, length)
                    break

    def _growth_blocks(self, seq: Sequence, blocks_held: int) -> int:
        if seq.is_prefix:
            return 0
        remaining = max(0, self.expected_completion(seq) - seq.num_completion_tokens)
        future = len(seq) + int(remaining * self.decode_reservation)
        return max(0, self.block_manager.blocks_for_tokens(future) - blocks_held)

    def _admission_cost(self, seq: Sequence) -> tuple[int, list[int]] | None:
        """Free blocks admitting `seq` takes now (new blocks + reserved decode growth) and the
        cached blocks it would reuse (lru mode); None while its prefix is still being computed."""
        bm = self.block_manager
        prefix = seq.start_prefix
        if prefix is not None and prefix.released:
            seq.start_prefix, seq.start_len = None, 0
            prefix = None
        total = bm.blocks_for_tokens(len(seq))
        hits: list[int] = []
        if prefix is not None:
            if not prefix.ready:
                return None
            new_blocks = total - seq.start_len // bm.block_size  # full prefix blocks are shared
        else:
            hits = bm.cached_prefix(seq)
            # a cached block nobody holds sits in the free list and leaves it when reused
            new_blocks = total - len(hits) + sum(1 for b in hits if bm.ref_counts[b] == 0)
        return new_blocks + self._growth_blocks(seq, total), hits

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> int:
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return budget  # nothing can be admitted: skip the reservation sum over running rows
        free_for_admission = self.block_manager.num_free_blocks - self._reserved_growth()
        scanned = 0
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            if scanned >= _ADMISSION_LOOKAHEAD:
                break
            seq = self.waiting[i]
            admission = self._admission_cost(seq)
            if admission is None:  # its prefix is still being computed: look further ahead
                i += 1
                scanned += 1
                continue
            cost, hits = admission
            if cost > free_for_admission:
                break  # first come, first served: a later item never jumps a too-large one
            del self.waiting[i]
            self._start(seq, hits)
            free_for_admission -= cost
            num = min(seq.num_uncomputed_tokens, budget)
            chunks.append(ScheduledChunk.of(seq, seq.num_computed_tokens, num))
            budget -= num
        return budget

    def _start(self, seq: Sequence, cached_hits: list[int]) -> None:
        bm = self.block_manager
        prefix = seq.start_prefix
        if prefix is not None:
            bm.start_on_prefix(seq, prefix.blocks[: bm.blocks_for_tokens(seq.start_len)], seq.start_len)
            seq.num_computed_tokens = seq.start_len
            seq.shared_blocks = seq.start_len // bm.block_size
            self._dependent_started(prefix)
        else:
            hits = cached_hits  # looked up by _admission_cost in this same scheduling pass
            bm.acquire(hits)
            seq.block_table = list(hits)
            seq.num_computed_tokens = seq.num_registered_blocks = len(hits)
            seq.num_computed_tokens *= bm.block_size
            seq.shared_blocks = len(hits)
        if not seq.is_prefix:
            self.prefix_hit_tokens += seq.num_computed_tokens
            # after a preemption cached blocks may reach into its answer: those are no prompt tokens
            seq.prefix_hit_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        bm.grow(seq, len(seq))
        seq.status = SequenceStatus.RUNNING
        seq.prefill_len = len(seq)
        self.running.append(seq)

    # -- shared prefix lifetimes ------------------------------------------------------------------
    def drop_dependent(self, prefix: SharedPrefixState) -> None:
        """A dependent counted in `prefix.dependents_left` will never start (a placeholder)."""
        self._dependent_started(prefix)

    def _dependent_started(self, prefix: SharedPrefixState) -> None:
        prefix.dependents_left -= 1
        if prefix.dependents_left == 0:
            self._release(prefix)

    def _release(self, prefix: SharedPrefixState) -> None:
        if prefix.ready and not prefix.released:
            self.pinned.remove(prefix)
            self.block_manager.free(prefix.seq)
        prefix.released = True
        self._drop_logits_after_step.append(prefix)  # a row started this step may still sample from them

    def _dissolve_newest_pinned(self) -> bool:
        """Fallback when pinned prefixes alone leave no room: drop one; its waiting dependents
        compute their whole prompt instead (less sharing, but no deadlock)."""
        if not self.pinned:
            return False
        self._release(self.pinned[-1])
        self.num_sharing_fallbacks += 1
        return True

    # -- preemption, progress, completion ---------------------------------------------------------
    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt newest sequences until `seq` can hold `num_tokens`; False if `seq` itself went."""
        if self.block_manager.holds(seq, num_tokens):  # most decode steps: nothing to take
            return True
        while not self.block_manager.can_grow(seq, num_tokens):
            if not self.running:
                return False
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.block_manager.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        prefix = seq.start_prefix
        if prefix is not None and not prefix.released:
            prefix.dependents_left += 1  # it will start on the prefix again
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def commit(self, chunks: list[ScheduledChunk]) -> None:
        """The forward pass wrote these chunks' K/V into the cache."""
        for prefix in self._drop_logits_after_step:
            prefix.logits = None
        self._drop_logits_after_step.clear()
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_full_blocks(seq)
            if seq.is_prefix and seq.num_computed_tokens == len(seq):
                self._prefix_ready(seq)

    def _prefix_ready(self, seq: Sequence) -> None:
        state = seq.prefix_state
        self.running.remove(seq)
        state.ready = True
        if state.dependents_left == 0:
            self.block_manager.free(seq)
            state.released = True
            state.logits = None
        else:
            self.pinned.append(state)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        self._learn_length(seq.num_completion_tokens)
