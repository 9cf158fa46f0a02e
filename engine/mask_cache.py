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


class StateMaskCache:
    def __init__(self, dfa: RegexDfa, token_bytes: list[bytes]) -> None:
        self.dfa = dfa
        self._token_bytes = token_bytes
        self._token_moves: dict[tuple[int, int], int] = {}  # (state, token) -> state
        self._masks: dict[int, torch.Tensor] = {}  # state -> bitmask row [ceil(vocab / 32)] int32

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

    def get(self, state: int) -> torch.Tensor | None:
        return self._masks.get(state)

    def put(self, state: int, row: torch.Tensor) -> None:
        if len(self._masks) < _MAX_STATES:
            self._masks[state] = row.clone()
