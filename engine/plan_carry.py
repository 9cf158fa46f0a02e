"""Carrying a shared prefix's KV from one plan chunk to the next, so a cut costs no prefill.

A job is fed to the engine in chunks of its globally sorted rows (planning.chunks), each planned on its
own. The rows on both sides of a cut share `shared_with_next` leading tokens, and without help the
next chunk computes them again. Instead, the chunk before a cut keeps one of its prefix states pinned
(one extra, placeholder dependent): the shallowest on its last row's path that covers the shared
tokens. When the next chunk is planned, its items that begin with those tokens start on the carried
state (their start length is their LCP with it), prefixes lying wholly inside it are not computed at
all, and then the placeholder is dropped. Rows equal to the carried tokens (exact duplicates of the row
before the cut) sample their first token from the carried state's kept logits. When no state on the
last row's path covers the shared tokens, one is inserted on it (`split_for_carry`), which costs no
extra work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

from engine.sequence import Sequence, SequenceStatus
from engine.shared_prefix import SharedPrefixState


@dataclass(frozen=True)
class Carry:
    state: SharedPrefixState  # pinned by one placeholder dependent until the next chunk is planned
    length: int  # its leading tokens the next chunk may start on


# One plan item in run order (parents before dependents): (is a prefix, prefix id or row index, the
# prefix it starts on or -1, tokens of that prefix it reuses).
PlanItem = tuple[bool, int, int, int]


@dataclass(frozen=True)
class Adoption:
    """How a chunk's plan uses the carried prefix."""

    skipped_prefixes: frozenset[int]  # prefix ids wholly inside the carried tokens: not computed
    start_lens: dict[tuple[bool, int], int]  # (is_prefix, index) -> tokens of the carry it starts on
    covered_tokens: int  # tokens of the chunk's trie the carry already holds


def choose_carry(last_row: Sequence, shared_with_next: int) -> Carry | None:
    """The prefix state to keep for the next chunk: on `last_row`'s path, the shallowest one holding
    `shared_with_next` tokens, else the deepest (holding fewer); None when the row starts on none."""
    path: list[tuple[SharedPrefixState, int]] = []  # deepest first: (state, tokens of it on the path)
    cur = last_row
    while cur.start_prefix is not None and not cur.start_prefix.released:
        path.append((cur.start_prefix, cur.start_len))
        cur = cur.start_prefix.seq
    covering = [(state, used) for state, used in path if used >= shared_with_next]
    if covering:
        return Carry(covering[-1][0], shared_with_next)
    if path and path[0][1] > 0:
        return Carry(path[0][0], path[0][1])
    return None


def split_for_carry(last_row: Sequence, length: int, prefix_id: int) -> SharedPrefixState:
    """When no prefix state on `last_row`'s path holds the `length` tokens the next chunk shares, a new
    one is put on the path (not yet started): it starts where the row started, and the row starts on
    it, so the row's own work is unchanged and the state can be carried."""
    assert last_row.status is SequenceStatus.WAITING and last_row.start_len < length <= len(last_row)
    seq = Sequence(("prefix", prefix_id), last_row.token_ids[:length], last_row.params, 0)
    seq.is_prefix = True
    state = SharedPrefixState(prefix_id, seq, 1, keeps_logits=length == len(last_row))
    seq.prefix_state = state
    seq.start_prefix, seq.start_len = last_row.start_prefix, last_row.start_len
    last_row.start_prefix, last_row.start_len = state, length
    return state


def adopt_carry(carry: Carry, items: Seq[PlanItem], prefix_length: Seq[int], prefix_source_row: Seq[int],
                prefix_keeps_logits: Seq[bool], seqs: Seq[Sequence]) -> Adoption:
    """Which of the plan's items start on the carried prefix, and at what length. Only items that start
    from nothing, or on a prefix the carry makes unnecessary, move; an item on a prefix that branches
    off the carried tokens cannot share more of them than its prefix."""
    carried = carry.state.seq.token_ids[: carry.length]

    def shared(tokens: Seq[int], cap: int) -> int:
        n = min(len(tokens), cap, len(carried))
        i = 0
        while i < n and tokens[i] == carried[i]:
            i += 1
        return i

    # the carried state's own last logits, kept while it is pinned: rows equal to the carried tokens
    # (exact duplicates of the last row before the cut) sample from them and compute nothing
    whole = carry.length == carry.state.length and carry.state.keeps_logits
    skipped: set[int] = set()
    starts: dict[tuple[bool, int], int] = {}
    covered = 0
    for is_prefix, index, start_prefix, _ in items:
        if start_prefix >= 0 and start_prefix not in skipped:
            continue
        if is_prefix:
            length = prefix_length[index]
            c = shared(seqs[prefix_source_row[index]].token_ids, length)
            if c >= length and (not prefix_keeps_logits[index] or (whole and length == carry.length)):
                skipped.add(index)
                covered = max(covered, c)
                continue
            # rows ending exactly here sample from its logits: it computes its last token
            c = min(c, length - 1)
        else:
            tokens = seqs[index].token_ids
            # a row computes at least its last token, for its logits, unless the carry has them
            c = shared(tokens, len(tokens) if whole and len(tokens) == carry.length else len(tokens) - 1)
        starts[(is_prefix, index)] = c
        covered = max(covered, c)
    return Adoption(frozenset(skipped), starts, covered)
