"""Grammar masks cached per DFA state, for constraints whose language is regular (engine/regex_dfa.py).

xgrammar parses a regex as a grammar, and inside a repeated free word (`( [a-z]+)*`) it re-checks thousands
of tokens per row per step (0.3-0.5 ms on a 32k vocabulary), although the answer is in the same automaton
state token after token. Here the first mask filled in a state is kept and copied for every later row in
that state, in any sequence of the job. The DFA follows each sequence's completion tokens by their bytes as
xgrammar decodes them (TokenizerInfo.decoded_vocab), so it reads exactly what the matcher read.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.grammar import StructuredOutput
from engine.regex_dfa import DEAD, RegexDfa

_MAX_STATES = 4096  # masks kept per constraint (4 KB each at a 32k vocabulary); later states are filled each time
_MAX_BIAS_STATES = 64  # host biases kept (128 KB each at a 32k vocabulary); a step with a later state expands its masks


class StateMaskCache:
    def __init__(self, dfa: RegexDfa, token_bytes: list[bytes]) -> None:
        self.dfa = dfa
        self._token_bytes = token_bytes
        self._token_moves: dict[tuple[int, int], int] = {}  # (state, token) -> state
        self._slots: dict[int, int] = {}  # state -> its row in the tables below
        self._masks: list[torch.Tensor] = []  # per slot: bitmask row [ceil(vocab / 32)] int32
        self._mask_table: torch.Tensor | None = None  # [slots, ceil(vocab / 32)], stacked when a step needs it
        self._bias_table: torch.Tensor | None = None  # [up to _MAX_BIAS_STATES, vocab] float32 host biases

    @staticmethod
    def of(spec: StructuredOutput, tokenizer_info: Any) -> StateMaskCache | None:
        """The cache of a constraint, or None where its language is not known here to be regular."""
        if spec.kind == "choices":
            dfa: RegexDfa | None = RegexDfa.of_labels(spec.labels)
        elif spec.kind == "regex":
            dfa = RegexDfa.of_regex(spec.value)
        else:
            dfa = None
        return None if dfa is None else StateMaskCache(dfa, tokenizer_info.decoded_vocab)

    def advance(self, state: int, tokens: list[int]) -> int:
        for token in tokens:
            key = (state, token)
            nxt = self._token_moves.get(key)
            if nxt is None:
                data = self._token_bytes[token] if token < len(self._token_bytes) else b""
                # an empty token is one xgrammar never allows while a constraint is open
                nxt = self._token_moves[key] = self.dfa.step(state, data) if data else DEAD
            # xgrammar's matcher accepted the token (GrammarMasks asserts it): the two languages differ
            assert nxt != DEAD, f"token {token} accepted by the grammar leaves the regex DFA: the cache is unsound"
            state = nxt
        return state

    def slot(self, state: int) -> int | None:
        """Where the state's mask is kept, or None if it was never filled (or the cache is full)."""
        return self._slots.get(state)

    def put(self, state: int, row: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Keeps the state's bitmask row (and its host bias: [vocab] float32, where the logits are there)."""
        if state in self._slots or len(self._slots) >= _MAX_STATES:  # rows of one step may share a new state
            return
        self._slots[state] = len(self._masks)
        self._masks.append(row.clone())
        self._mask_table = None
        if bias is not None and len(self._masks) <= _MAX_BIAS_STATES:
            rows = bias.unsqueeze(0)
            self._bias_table = rows.clone() if self._bias_table is None else torch.cat([self._bias_table, rows])

    def masks(self, slots: list[int]) -> torch.Tensor:
        """[len(slots), ceil(vocab / 32)] int32 bitmask rows."""
        if self._mask_table is None:
            self._mask_table = torch.stack(self._masks)
        return self._mask_table.index_select(0, torch.tensor(slots))

    def biases(self, slots: list[int]) -> torch.Tensor | None:
        """[len(slots), vocab] float32 host biases, or None where one of the slots has none kept."""
        table = self._bias_table
        if table is None or max(slots) >= table.shape[0]:
            return None
        return table.index_select(0, torch.tensor(slots))
