"""Stop strings found incrementally: each step decodes only the few tokens since the last clean
character boundary and searches only the text a new match could end in, so a step costs the same
at token 5 as at token 5000 (decoding the whole completion every step was quadratic).

Incremental detokenization as in vLLM and transformers' TextStreamer: text is committed only up to
a token boundary where the decoded text does not end in U+FFFD, because a token may end inside a
UTF-8 character that the next token completes. The undecided rest is searched too, so with a
byte-level BPE tokenizer (Llama 3, Qwen) the text searched is exactly `decode(completion tokens)`
at every step, U+FFFD included. A byte-fallback tokenizer (Llama 2, Mistral) re-decodes a whole run
of byte tokens as U+FFFDs when a later byte makes the run invalid UTF-8, rewriting text already
committed; a stop string is still found at the same token unless it contains U+FFFD itself, and the
engine cuts the answer where the full decode has its earliest stop string.
"""
from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character
# A held (undecided) tail of at least twice this many tokens is cut this many tokens from its end:
# more than 3 characters after a cut leave no UTF-8 sequence (at most 4 bytes) open across it.
_CUT_LOOKAHEAD = 4
# Tokens the context may lag behind the committed end while they decode to no text.
_MAX_CONTEXT = 8


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest of the (non-empty) stop strings starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_string_at(text: str, index: int, stops: Sequence[str]) -> str:
    """The stop string that starts at `index` of `text` (the longest, when several do). Where a
    byte-fallback re-decode turned it into U+FFFDs (see above) none does: then the earliest in `text`,
    else the first stop string, so a cut answer always names a stop string."""
    at = [s for s in stops if s and text.startswith(s, index)]
    if at:
        return max(at, key=len)
    found = sorted((text.find(s), s) for s in stops if s and s in text)
    return found[0][1] if found else next(s for s in stops if s)


class StopStringWatch:
    """Where the earliest stop string starts in one sequence's decoded completion, token by token.

    Offsets index the sequence's whole token list (prompt included): tokens [context_start,
    committed_end) are decoded again each step only as context (a decoder may drop or merge the
    first token's leading space), and the text of every token before committed_end is final.
    """

    def __init__(self, stops: Sequence[str], completion_start: int) -> None:
        self.stops = tuple(s for s in stops if s)
        self._keep = max(map(len, self.stops), default=1) - 1  # committed characters a new match may start in
        self._context_start = completion_start
        self._committed_end = completion_start
        self._committed_chars = 0
        self._committed_tail = ""  # the last `_keep` committed characters

    def find(self, decode: Decode, token_ids: Sequence[int]) -> int | None:
        """Index in `decode(completion tokens)` where the earliest stop string starts, or None.
        Call it after each new token (several new tokens at once are fine)."""
        if not self.stops:
            return None
        end = len(token_ids)
        context = decode(token_ids[self._context_start : self._committed_end])
        window = decode(token_ids[self._context_start : end])
        new = window[len(context) :]
        if not new.endswith(_REPLACEMENT):
            committed, pending = new, ""
            self._advance(end, visible=bool(committed))
        else:
            committed = self._cut_held_tail(decode, token_ids, context, window)
            pending = new[len(committed) :]
        hit = first_stop(self._committed_tail + committed + pending, self.stops)
        first = None if hit is None else self._committed_chars - len(self._committed_tail) + hit
        self._committed_chars += len(committed)
        tail = self._committed_tail + committed
        self._committed_tail = tail[max(0, len(tail) - self._keep) :] if self._keep else ""
        return first

    def _cut_held_tail(self, decode: Decode, token_ids: Sequence[int], context: str, window: str) -> str:
        """Text to commit from a tail that still ends in U+FFFD: none, unless the tail has grown long
        (invalid bytes keep it open) and a cut near its end is a character boundary whatever comes next."""
        end = len(token_ids)
        cut = end - _CUT_LOOKAHEAD
        if cut - self._committed_end < _CUT_LOOKAHEAD:
            return ""
        before = decode(token_ids[self._context_start : cut])
        after = decode(token_ids[cut:end])
        # the text splits at `cut` (no character spans it), with enough bytes after it to be final
        if len(after) <= 3 or window != before + after or not before.startswith(context):
            return ""
        self._advance(cut, visible=len(before) > len(context))
        return before[len(context) :]

    def _advance(self, committed_end: int, visible: bool) -> None:
        """Commit tokens up to `committed_end`. The context moves up to the newly committed tokens only
        when they show text: a token that decodes to nothing (an unknown or special token) cannot stand
        in front of the next token, whose leading space a decoder would then drop as if it began the
        text; a context that has lagged _MAX_CONTEXT tokens moves anyway, to keep steps bounded."""
        if visible or committed_end - self._context_start > _MAX_CONTEXT:
            self._context_start = self._committed_end
        self._committed_end = committed_end
