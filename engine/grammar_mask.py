"""Per-step token masks of constrained sequences: a grammar matcher per sequence, one batched bitmask
per step filled on the host and applied to the logits on their device before sampling.

A matcher follows its sequence's completion tokens: it starts at the first generated token (so with a
chat template only the assistant's answer is constrained) and advances with each accepted token. A
preempted sequence keeps its generated tokens and is recomputed, so its matcher stays valid as it is;
a matcher created late (or for a sequence that already holds completion tokens) first replays them.
EOS is allowed only where the grammar may end, because the grammar's stop tokens are the engine's EOS ids.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence as Seq

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
        self._filler: ThreadPoolExecutor | None = None  # one worker: a step's mask fill overlaps its forward pass

    def check(self, seq: Sequence) -> None:
        """Compile (or find cached) the sequence's grammar now, so a bad one fails at admission."""
        spec = seq.params.structured
        if spec is not None:
            compile_constraint(spec, self.model_dir, self.vocab_size, self.stop_token_ids)

    def begin_step(self, seqs: Seq[Sequence]) -> Callable[[], TokenMask | None]:
        """Starts filling the step's mask on a worker thread and returns the call that waits for it.
        xgrammar releases the GIL while it fills, so the fill runs beside the forward pass; the matchers
        are not touched elsewhere until the step's tokens are accepted, after that wait."""
        if all(s.params.structured is None for s in seqs):
            return lambda: None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        return self._filler.submit(self.step_mask, list(seqs)).result

    def step_mask(self, seqs: Seq[Sequence]) -> TokenMask | None:
        """The bitmask for this step's sampling rows, or None when none of them is constrained.
        Rows are filled in parallel by xgrammar's batch matcher, one thread per host core."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return None
        bitmask = self._rows(len(seqs))
        matchers = [self._matcher(seqs[i]) for i in rows]
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1)
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
    if logits.device.type != "cpu":
        import xgrammar as xgr

        bitmask = mask.bitmask.to(logits.device, non_blocking=True)
        indices = mask.rows if len(mask.rows) < logits.shape[0] else None
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
        return
    # On the host, one table lookup per bitmask byte gives its 8 tokens' additive bias (0 or -inf):
    # 3-5x faster than xgrammar's CPU kernel at a 32k vocabulary (bench/structured_overhead.py).
    rows = mask.rows
    vocab = logits.shape[1]
    packed = mask.bitmask[rows].view(torch.uint8).reshape(-1).int()  # [len(rows) * words * 4]
    bias = torch.nn.functional.embedding(packed, _BYTE_BIAS).view(len(rows), -1)[:, :vocab]  # [len(rows), vocab]
    if len(rows) == logits.shape[0]:
        logits.add_(bias)
    else:
        logits[rows] += bias


def _byte_bias() -> torch.Tensor:
    """[256, 8] float32: row b holds 0.0 where bit i of b is set (allowed) and -inf where it is not."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # little-endian bits, as xgrammar packs
    return torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf"))


_BYTE_BIAS = _byte_bias()
