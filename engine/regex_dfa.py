"""A byte-level DFA of a constraint whose language is regular (a regex in a conservative subset, or a label
set), built lazily: it names the state a constrained answer is in, so a grammar mask can be cached per state.

Why a state names the mask: a token is allowed where its bytes start some string of the language left to
match from here (EOS where the empty string is one of them), so the mask is a function of that remaining
language, and a DFA state determines it. That holds only if this DFA's language is exactly the one xgrammar
compiled, so the subset is what both read alike: literals (any code point, as its UTF-8 bytes), ASCII
character classes and ranges (no negation, no `.`, no \\w \\s, which differ between regex dialects; \\d is
[0-9]), groups without flags, `|`, and the quantifiers `* + ? {m} {m,n} {m,}` (lazy ones match the same
language). Anything else (anchors, lookarounds, back-references, flags, `{,n}`) returns None: no cache.
Patterns are read by Python's own regex parser (re._parser): it is the stdlib's, and its tree is the subset
check.
"""
from __future__ import annotations

import re
from typing import Iterable

try:  # Python >= 3.11
    import re._constants as sre
    import re._parser as sre_parse
except ImportError:  # pragma: no cover  (Python 3.10)
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

DEAD = -1
_MAX_NFA_STATES = 20_000  # a bigger automaton (large counted repeats) is not worth caching: no cache
_DIGITS = frozenset(range(0x30, 0x3A))


class Unsupported(Exception):
    """The pattern leaves the subset whose meaning is the same for xgrammar and here."""


class _Nfa:
    """Thompson NFA over bytes: state i has byte edges `edges[i]` and epsilon edges `eps[i]`."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[frozenset[int], int]]] = []
        self.eps: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= _MAX_NFA_STATES:
            raise Unsupported("automaton too large")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def chain(self, byte_sets: Iterable[frozenset[int]]) -> tuple[int, int]:
        start = end = self.state()
        for byte_set in byte_sets:
            nxt = self.state()
            self.edges[end].append((byte_set, nxt))
            end = nxt
        return start, end

    def build(self, items: list) -> tuple[int, int]:  # noqa: ANN001  (an re._parser SubPattern's items)
        """A fragment (start, end) matching the concatenation of the parsed items."""
        start = end = self.state()
        for op, arg in items:
            s, e = self._item(op, arg)
            self.eps[end].append(s)
            end = e
        return start, end

    def _item(self, op, arg) -> tuple[int, int]:  # noqa: ANN001
        if op is sre.LITERAL:
            return self.chain(frozenset((b,)) for b in chr(arg).encode("utf-8"))
        if op is sre.IN:
            return self.chain([_byte_class(arg)])
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            if add_flags or del_flags:
                raise Unsupported("inline flags")
            return self.build(list(sub))
        if op is sre.BRANCH:
            start, end = self.state(), self.state()
            for alternative in arg[1]:
                s, e = self.build(list(alternative))
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        if op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
            low, high, sub = arg
            items = list(sub)
            start = end = self.state()
            for _ in range(low):
                s, e = self.build(items)
                self.eps[end].append(s)
                end = e
            if high == sre.MAXREPEAT:  # a loop: end --> sub --> end
                s, e = self.build(items)
                self.eps[end].append(s)
                self.eps[e].append(end)
                return start, end
            last = self.state()
            for _ in range(high - low):  # each optional copy may stop early
                s, e = self.build(items)
                self.eps[end].append(s)
                self.eps[end].append(last)
                end = e
            self.eps[end].append(last)
            return start, last
        raise Unsupported(str(op))


def _byte_class(items: list) -> frozenset[int]:  # noqa: ANN001
    out: set[int] = set()
    for op, arg in items:
        if op is sre.LITERAL and arg < 0x80:
            out.add(arg)
        elif op is sre.RANGE and arg[1] < 0x80:
            out.update(range(arg[0], arg[1] + 1))
        elif op is sre.CATEGORY and arg is sre.CATEGORY_DIGIT:
            out.update(_DIGITS)
        else:
            raise Unsupported(f"class item {op}")
    return frozenset(out)


class RegexDfa:
    """Subset construction done on demand: states are numbered as they are first reached."""

    def __init__(self, nfa: _Nfa, start: int, accept: int) -> None:
        self._nfa = nfa
        self._accept = accept
        self._sets: list[frozenset[int]] = []
        self._index: dict[frozenset[int], int] = {}
        self._moves: dict[tuple[int, int], int] = {}  # (state, byte) -> state
        self.start = self._state_of(self._closure({start}))

    @staticmethod
    def of_regex(pattern: str) -> RegexDfa | None:
        """The DFA of `pattern` (whole-string match), or None where it leaves the subset."""
        if "{," in pattern:  # Python reads {,n} as {0,n}; other dialects read it literally
            return None
        try:
            parsed = sre_parse.parse(pattern)
            if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:  # (?i), (?s), ... at the top level
                return None
            nfa = _Nfa()
            start, end = nfa.build(list(parsed))
        except (Unsupported, re.error, RecursionError):
            return None
        return RegexDfa(nfa, start, end)

    @staticmethod
    def of_labels(labels: list[str]) -> RegexDfa:
        nfa = _Nfa()
        start, end = nfa.state(), nfa.state()
        for label in labels:
            s, e = nfa.chain(frozenset((b,)) for b in label.encode("utf-8"))
            nfa.eps[start].append(s)
            nfa.eps[e].append(end)
        return RegexDfa(nfa, start, end)

    @property
    def num_states(self) -> int:
        return len(self._sets)

    def accepts_empty(self, state: int) -> bool:
        return state != DEAD and self._accept in self._sets[state]

    def step(self, state: int, data: bytes) -> int:
        """The state after reading `data` from `state`; DEAD where no string of the language continues so."""
        for byte in data:
            if state == DEAD:
                return DEAD
            key = (state, byte)
            nxt = self._moves.get(key)
            if nxt is None:
                targets = {t for s in self._sets[state] for byte_set, t in self._nfa.edges[s] if byte in byte_set}
                nxt = self._state_of(self._closure(targets)) if targets else DEAD
                self._moves[key] = nxt
            state = nxt
        return state

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for t in self._nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _state_of(self, closure: frozenset[int]) -> int:
        state = self._index.get(closure)
        if state is None:
            state = self._index[closure] = len(self._sets)
            self._sets.append(closure)
        return state
