"""Per-step token masks of constrained sequences: a grammar matcher per sequence, one batched bitmask
per step filled on the host and applied to the logits on their device before sampling.

A matcher follows its sequence's completion tokens: it starts at the first generated token (so with a
chat template only the assistant's answer is constrained) and advances with each accepted token. A
preempted sequence keeps its generated tokens and is recomputed, so its matcher stays valid as it is;
a matcher created late (or for a sequence that already holds completion tokens) first replays them.
EOS is allowed only where the grammar may end, because the grammar's stop tokens are the engine's EOS ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from engine.grammar import compile_constraint
from engine.sequence import Sequence


@dataclass(frozen=True)
class TokenMask:
    bitmask: torch.Tensor  # [sampling rows, ceil(vocab / 32)] int32 on the host; bit 1 = allowed
    rows: list[int]  # rows of the step's sampling order that are constrained


class GrammarMasks:
    def __init__(self, model_dir: str | Path, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.model_dir = str(model_dir)
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._matchers: dict[int, Any] = {}  # seq_id -> xgrammar.GrammarMatcher
        self._buffer: torch.Tensor | None = None
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, made on first use

    def check(self, seq: Sequence) -> None:
        """Compile (or find cached) the sequence's grammar now, so a bad one fails at admission."""
        spec = seq.params.structured
        if spec is not None:
            compile_constraint(spec, self.model_dir, self.vocab_size, self.stop_token_ids)

    def step_mask(self, seqs: Seq[Sequence]) -> TokenMask | None:
        """The bitmask for this step's sampling rows, or None when none of them is constrained.
        Rows are filled in parallel by xgrammar's batch matcher (its threads: half the host's cores)."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return None
        bitmask = self._rows(len(seqs))
        matchers = [self._matcher(seqs[i]) for i in rows]
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        return TokenMask(bitmask, rows)

    def accept(self, seq: Sequence, token: int) -> None:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is not None and not matcher.is_terminated():
            accepted = matcher.accept_token(token)
            assert accepted, f"token {token} was sampled although the grammar mask forbids it"

    def release(self, seq: Sequence) -> None:
        self._matchers.pop(seq.seq_id, None)

    def _matcher(self, seq: Sequence) -> Any:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            import xgrammar as xgr

            spec = seq.params.structured
            assert spec is not None
            compiled = compile_constraint(spec, self.model_dir, self.vocab_size, self.stop_token_ids)
            matcher = xgr.GrammarMatcher(compiled)
            for token in seq.completion_token_ids:
                matcher.accept_token(token)
            self._matchers[seq.seq_id] = matcher
        return matcher

    def _rows(self, n: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[0] < n:
            import xgrammar as xgr

            self._buffer = xgr.allocate_token_bitmask(max(n, 64), self.vocab_size)
        return self._buffer[:n]


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """logits: [sampling rows, vocab] float32, masked in place (forbidden tokens -> -inf)."""
    import xgrammar as xgr

    bitmask = mask.bitmask.to(logits.device, non_blocking=True)
    indices = mask.rows if len(mask.rows) < logits.shape[0] else None
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
