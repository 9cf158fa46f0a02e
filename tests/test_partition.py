"""Partitioning a sorted job over N replicas (engine/planning/partition.py): whole top-level prefix
groups per replica unless a group is larger than a fair share, balanced work, every row placed once."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from engine import PackedSequences, group_starts, partition_sorted, sort_sequences, unique_prompt_tokens


def _sorted(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.array([t for r in rows for t in r], dtype=np.int32)
    ordered = sort_sequences(PackedSequences(tokens, offsets))
    return lengths[ordered.order], ordered.lcp


def _doc_qa(docs: list[tuple[int, int]], opening: int = 5) -> list[list[int]]:
    """A template opening, then per document (length, questions) its tokens and 2-token questions."""
    rows = []
    for d, (doc_len, questions) in enumerate(docs):
        doc = [1000 + d] + [7] * (doc_len - 1)
        rows += [[1] * opening + doc + [2000 + q, 3] for q in range(questions)]
    return rows


def _groups(lengths: np.ndarray, lcp: np.ndarray, decode: int = 0) -> list[tuple[int, int]]:
    starts = group_starts(lengths, lcp, decode).tolist()
    return list(zip(starts, starts[1:] + [len(lcp)]))


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=25),
    parts=st.integers(1, 6),
    decode=st.integers(0, 16),
)
def test_groups_stay_whole_and_parts_are_balanced(docs: list[tuple[int, int]], parts: int, decode: int) -> None:
    lengths, lcp = _sorted(_doc_qa(docs))
    p = partition_sorted(lengths, lcp, decode, parts)
    n = len(lengths)
    assert p.part.shape == (n,) and p.part.min() >= 0 and p.part.max() < parts
    common = int(lcp[1:].min()) if n > 1 else 0
    # the estimate: the job's trie tokens and decode, plus the common prefix once more per extra part
    # (and a split group's prefix once more per piece)
    least = unique_prompt_tokens(lengths, lcp) + n * decode + common * (parts - 1)
    groups = _groups(lengths, lcp, decode)
    assert p.top_groups == len(groups)
    # a group's rows add their trie tokens and decode, and its prefix below the common one is computed
    # again where it lands (none for the groups that hang off the common prefix itself)
    group_work = [int((lengths[a:b] - lcp[a:b] + decode).sum()) + (int(lcp[a]) - common if a else -common)
                  for a, b in groups]
    again = sum(int(lcp[a]) - common for a, _ in groups if a)
    assert int(p.work.sum()) == least + again if p.split_groups == 0 else int(p.work.sum()) > least + again
    fair = least / parts
    for (a, b), w in zip(groups, group_work):
        if w <= fair:  # a group that fits a fair share is never split
            assert len(set(p.part[a:b].tolist())) == 1
    if max(group_work) <= fair:
        assert p.split_groups == 0
    # LPT: the largest part exceeds a fair share by at most the largest piece (a whole group, or a piece
    # of a split one, which is at most a fair share unless it is a single row)
    largest_piece = max(max(min(w, fair) for w in group_work), int((lengths + decode).max()))
    assert p.work.max() <= p.work.sum() / parts + largest_piece


def test_equal_documents_split_evenly_and_whole() -> None:
    lengths, lcp = _sorted(_doc_qa([(30, 4)] * 8))
    p = partition_sorted(lengths, lcp, decode_tokens=8, parts=2)
    assert p.split_groups == 0 and p.top_groups == 8 and p.balance == 1.0
    for a, b in _groups(lengths, lcp):
        assert len(set(p.part[a:b].tolist())) == 1


def test_a_group_larger_than_a_fair_share_is_split_at_its_children_and_counted() -> None:
    # one document with 40 questions (each with a long private part) and three small documents
    rows = [[1] * 5 + [999] + [7] * 20 + [2000 + q] + [9] * 30 for q in range(40)]
    rows += _doc_qa([(10, 2)] * 3)
    lengths, lcp = _sorted(rows)
    p = partition_sorted(lengths, lcp, decode_tokens=4, parts=4)
    assert p.split_groups == 1
    assert p.balance < 1.2  # the big group's questions spread over the four parts


def test_documents_are_the_groups_whatever_their_labels_share() -> None:
    # "[1] ...", "[10] ...", "[100] ...": the labels share a digit below the template's opening, which
    # makes "[1" a trie node over 111 documents; the groups must still be the documents
    opening = [ord(c) for c in "Document: ["]
    rows = []
    for d in range(200):
        doc = [ord(c) for c in f"{d}] "] + [(d * 7 + j) % 50 + 100 for j in range(40)]
        rows += [opening + doc + [ord("Q"), 48 + q] for q in range(5)]
    lengths, lcp = _sorted(rows)
    assert len(_groups(lengths, lcp, 8)) == 200
    p = partition_sorted(lengths, lcp, decode_tokens=8, parts=8)
    assert p.top_groups == 200 and p.split_groups == 0 and p.balance < 1.05
