"""Per-step token masks of constrained sequences: a grammar matcher per sequence, one batched bitmask
per step filled on the host and applied to the logits on their device before sampling.

A matcher follows its sequence's completion tokens: it starts at the first generated token (so with a
chat template only the assistant's answer is constrained) and, on the mask worker, reads the tokens
sampled since its last step before it fills. Constraints whose language is regular also follow a DFA
state, and a mask filled once in a state is reused (engine/mask_cache.py).
EOS is allowed only where the grammar may end, because the grammar's stop tokens are the engine's EOS ids.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence as Seq

import torch

from engine.grammar import StructuredOutput, compile_constraint, tokenizer_info
from engine.mask_cache import StateMaskCache
from engine.regex_dfa import DEAD
from engine.sequence import Sequence


@dataclass(frozen=True)
class TokenMask:
    bitmask: torch.Tensor  # [sampling rows, ceil(vocab / 32)] int32 on the host; bit 1 = allowed
    rows: list[int]  # rows of the step's sampling order that are constrained
    bias: torch.Tensor | None = None  # [len(rows), vocab] float32, 0 or -inf: the bitmask expanded for host logits


@dataclass
class _Follower:
    """A constrained sequence's grammar state, touched only by the mask worker: the matcher and the DFA
    state (DEAD where the constraint has no mask cache) after the first `read` completion tokens."""

    matcher: Any  # xgrammar.GrammarMatcher
    dfa_state: int
    read: int = 0


class GrammarMasks:
    def __init__(
        self, model_dir: str | Path, vocab_size: int, stop_token_ids: frozenset[int], *, host_logits: bool
    ) -> None:
        """host_logits: the logits are on the host, so the mask is also expanded into an additive bias on
        the worker thread (beside the forward pass), leaving one add to the sampler."""
        self.model_dir = str(model_dir)
        self.host_logits = host_logits
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._followers: dict[int, _Follower] = {}  # seq_id ->
        self._caches: dict[StructuredOutput, StateMaskCache | None] = {}  # None: a language not known regular
        self._buffer: torch.Tensor | None = None
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, made on first use
        self._filler: ThreadPoolExecutor | None = None  # one worker: a step's mask fill overlaps its forward pass

    def check(self, seq: Sequence) -> None:
        """Compile (or find cached) the sequence's grammar now, so a bad one fails at admission."""
        spec = seq.params.structured
        if spec is not None:
            compile_constraint(spec, self.model_dir, self.vocab_size, self.stop_token_ids)

    def begin_step(self, seqs: Seq[Sequence]) -> Callable[[], TokenMask | None]:
        """Starts the step's mask on a worker thread and returns the call that waits for it. The worker
        first advances each row's matcher over the tokens sampled since its last step, then fills; xgrammar
        releases the GIL while it fills, so all of it runs beside the forward pass. Matchers are touched by
        nothing else: a sequence's tokens change only after that wait."""
        if all(s.params.structured is None for s in seqs):
            return lambda: None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        return self._filler.submit(self.step_mask, list(seqs)).result

    def step_mask(self, seqs: Seq[Sequence]) -> TokenMask | None:
        """The bitmask for this step's sampling rows, or None when none of them is constrained.
        A row whose constraint is regular and whose DFA state was filled before copies that mask
        (engine/mask_cache.py); the others are filled in parallel by xgrammar's batch matcher, one
        thread per host core."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return None
        bitmask = self._rows(len(seqs))
        fill_rows: list[int] = []
        fill_matchers: list[Any] = []
        misses: list[tuple[int, StateMaskCache, int]] = []  # (row, cache, DFA state) to keep once filled
        hits: list[tuple[int, StateMaskCache, int]] = []  # (row, cache, slot of the kept mask)
        for i in rows:
            cache = self._cache(seqs[i])
            follower = self._follow(seqs[i], cache)
            if cache is not None:
                slot = cache.slot(follower.dfa_state)
                if slot is not None:
                    hits.append((i, cache, slot))
                    continue
                misses.append((i, cache, follower.dfa_state))
            fill_rows.append(i)
            fill_matchers.append(follower.matcher)
        if fill_rows:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1)
            self._batch.batch_fill_next_token_bitmask(fill_matchers, bitmask, fill_rows)
        for i, cache, state in misses:
            cache.put(state, bitmask[i], host_bias(bitmask, [i], self.vocab_size)[0] if self.host_logits else None)
        bias = None
        if hits and not fill_rows and all(cache is hits[0][1] for _, cache, _ in hits):
            # the usual step of a regular constraint: every row copies kept rows from one table
            slots = [slot for _, _, slot in hits]
            bitmask[rows] = hits[0][1].masks(slots)
            bias = hits[0][1].biases(slots) if self.host_logits else None
        else:
            for i, cache, slot in hits:
                bitmask[i] = cache.masks([slot])[0]
        if self.host_logits and bias is None:
            bias = host_bias(bitmask, rows, self.vocab_size)
        return TokenMask(bitmask, rows, bias)

    def must_end(self, seq: Sequence) -> bool:
        """Whether the constrained sequence's completion is a whole value that nothing can extend: after
        its tokens the grammar allows only end-of-sequence. Called between steps, when the mask worker
        is idle (the step's mask was waited for before its tokens were appended)."""
        follower = self._follow(seq, self._cache(seq))
        if follower.matcher.is_terminated():
            return True
        import xgrammar as xgr

        # not the step buffer: a device copy of this step's mask may still be reading it
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        follower.matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = (host_bias(bitmask, [0], self.vocab_size)[0] == 0).nonzero().flatten().tolist()
        return bool(allowed) and set(allowed) <= self.stop_token_ids

    def release(self, seq: Sequence) -> None:
        self._followers.pop(seq.seq_id, None)

    def _follow(self, seq: Sequence, cache: StateMaskCache | None) -> _Follower:
        """The sequence's follower, advanced over its completion tokens: a new one (a sequence's first step,
        or one that already holds completion tokens) reads them all; a preempted sequence keeps its tokens
        and is recomputed, so its follower stays valid as it is."""
        follower = self._followers.get(seq.seq_id)
        if follower is None:
            import xgrammar as xgr

            spec = seq.params.structured
            assert spec is not None
            compiled = compile_constraint(spec, self.model_dir, self.vocab_size, self.stop_token_ids)
            follower = _Follower(xgr.GrammarMatcher(compiled), cache.dfa.start if cache is not None else DEAD)
            self._followers[seq.seq_id] = follower
        tokens = seq.completion_token_ids
        if follower.read < len(tokens):
            new = tokens[follower.read :]
            for token in new:
                accepted = follower.matcher.accept_token(token)
                assert accepted, f"token {token} was sampled although the grammar mask forbids it"
            if cache is not None:
                follower.dfa_state = cache.advance(follower.dfa_state, new)
            follower.read = len(tokens)
        return follower

    def _cache(self, seq: Sequence) -> StateMaskCache | None:
        spec = seq.params.structured
        assert spec is not None
        if spec not in self._caches:
            info = tokenizer_info(self.model_dir, self.vocab_size, tuple(sorted(self.stop_token_ids)))
            self._caches[spec] = StateMaskCache.of(spec, info)
        return self._caches[spec]

    def _rows(self, n: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[0] < n:
            import xgrammar as xgr

            self._buffer = xgr.allocate_token_bitmask(max(n, 64), self.vocab_size)
        return self._buffer[:n]


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """logits: [sampling rows, vocab] float32, masked in place (forbidden tokens -> -inf)."""
    if logits.device.type != "cpu":
        import xgrammar as xgr

        bitmask = mask.bitmask.to(logits.device, non_blocking=True)
        indices = mask.rows if len(mask.rows) < logits.shape[0] else None
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
        return
    rows = mask.rows
    bias = mask.bias if mask.bias is not None else host_bias(mask.bitmask, rows, logits.shape[1])
    assert bias.shape == (len(rows), logits.shape[1])
    if len(rows) == logits.shape[0]:
        logits.add_(bias)
    else:
        logits[rows] += bias


def host_bias(bitmask: torch.Tensor, rows: list[int], vocab: int) -> torch.Tensor:
    """[len(rows), vocab] float32 additive mask of the bitmask's rows. One table lookup per bitmask byte
    gives its 8 tokens' bias (0 or -inf): with the add, 3-5x faster than xgrammar's CPU kernel at a 32k
    vocabulary (bench/structured_overhead.py)."""
    packed = bitmask[rows].view(torch.uint8).reshape(-1).int()  # [len(rows) * words * 4]
    return torch.nn.functional.embedding(packed, _BYTE_BIAS).view(len(rows), -1)[:, :vocab]


def _byte_bias() -> torch.Tensor:
    """[256, 8] float32: row b holds 0.0 where bit i of b is set (allowed) and -inf where it is not."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # little-endian bits, as xgrammar packs
    return torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf"))


_BYTE_BIAS = _byte_bias()
