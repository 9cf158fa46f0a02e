"""The run-time prefix plan: which shared prefixes to compute once, and in what order rows run.

Built per wave of requests from the compact token trie (sorted sequences + neighbour LCPs, one
stack pass). Every internal trie node becomes a shared prefix computed exactly once; a child
prefix starts on its parent's KV. A row starts on its deepest shared prefix and computes only the
rest. A row that ends exactly at a node (an exact duplicate, or a prompt that others extend)
computes nothing: the node keeps the logits of its last position and the row draws its first
token from them. So without preemption the plan's prefill work is exactly the trie's token count.

Order: depth-first over the trie; among siblings, the larger expected decode per prefill token
first, so long decodes overlap later prefill chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq


@dataclass(frozen=True)
class SharedPrefix:
    prefix_id: int
    parent_id: int  # -1: starts from nothing
    length: int  # tokens, counted from the start of the prompt
    source_row: int  # a request whose tokens begin with this prefix
    num_dependents: int  # child prefixes + rows that start on it
    keeps_logits: bool  # a row ends exactly here and samples its first token from these logits


@dataclass(frozen=True)
class PlanItem:
    """One unit of scheduler work: compute a shared prefix, or run a row."""

    is_prefix: bool
    index: int  # prefix_id or request index
    start_prefix: int  # prefix this item starts on (-1: none)
    start_len: int  # tokens of that prefix it reuses


@dataclass(frozen=True)
class ExecutionPlan:
    prefixes: tuple[SharedPrefix, ...]
    items: tuple[PlanItem, ...]  # parents before dependents
    unique_prompt_tokens: int  # trie token count: the least prefill work possible


def _lcp(a: Seq[int], b: Seq[int], window: int = 64) -> int:
    # window-wise slice comparison runs in C; only the first differing window is scanned in Python
    # (converting whole prompts to arrays would cost more than the comparison itself)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i : i + window] == b[i : i + window]:
        i += window
    if i >= n:
        return n
    end = min(i + window, n)
    while i < end and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Node:
    depth: int
    parent: "_Node | None"
    children: list  # of _Node or int (row index), in sorted order
    min_row_len: int = 1 << 62
    rows: int = 0
    decode: int = 0
    prefill: int = 0


def build_plan(token_ids: Seq[Seq[int]], max_tokens: Seq[int]) -> ExecutionPlan:
    """Plan for requests given as token lists (all non-empty) with their decode budgets."""
    n = len(token_ids)
    order = sorted(range(n), key=lambda i: token_ids[i])
    root = _Node(0, None, [])
    stack = [root]
    prev: int | None = None
    unique = 0
    for row in order:
        lcp = 0 if prev is None else _lcp(token_ids[prev], token_ids[row])
        unique += len(token_ids[row]) - lcp
        # close nodes deeper than the shared part; split the last closed edge if lcp falls inside it
        last: _Node | None = None
        while stack[-1].depth > lcp:
            last = stack.pop()
        if stack[-1].depth < lcp:
            node = _Node(lcp, stack[-1], [])
            # the edge being split is always the newest child of the stack top (rows arrive sorted)
            moved = stack[-1].children.pop()
            if last is not None:
                assert moved is last
                last.parent = node
            else:  # lcp is inside the previous row's leaf edge
                assert moved == prev
            node.children.append(moved)
            stack[-1].children.append(node)
            stack.append(node)
        stack[-1].children.append(row)
        prev = row
    return _flatten(root, token_ids, max_tokens, unique)


def _annotate(node: _Node, token_ids: Seq[Seq[int]], max_tokens: Seq[int]) -> None:
    # post-order sums without recursion depth limits
    post: list[_Node] = []
    todo = [node]
    while todo:
        cur = todo.pop()
        post.append(cur)
        todo.extend(c for c in cur.children if isinstance(c, _Node))
    for cur in reversed(post):
        for child in cur.children:
            if isinstance(child, _Node):
                cur.rows += child.rows
                cur.decode += child.decode
                cur.prefill += child.prefill + (child.depth - cur.depth)
                cur.min_row_len = min(cur.min_row_len, child.min_row_len)
            else:
                length = len(token_ids[child])
                cur.rows += 1
                cur.decode += max_tokens[child]
                cur.prefill += length - cur.depth
                cur.min_row_len = min(cur.min_row_len, length)


def _priority(child: "_Node | int", parent: _Node, token_ids: Seq[Seq[int]], max_tokens: Seq[int]) -> float:
    if isinstance(child, _Node):
        return child.decode / max(1, child.prefill + child.depth - parent.depth)
    return max_tokens[child] / max(1, len(token_ids[child]) - parent.depth)


def _flatten(root: _Node, token_ids: Seq[Seq[int]], max_tokens: Seq[int], unique: int) -> ExecutionPlan:
    _annotate(root, token_ids, max_tokens)
    prefixes: list[dict] = []
    items: list[PlanItem] = []
    # stack of (node, prefix id the node's subtree starts on, its length)
    todo: list[tuple[_Node | int, int, int]] = [(root, -1, 0)]
    while todo:
        entry, start_id, start_len = todo.pop()
        if not isinstance(entry, _Node):
            length = len(token_ids[entry])
            assert start_len <= length
            items.append(PlanItem(False, entry, start_id, start_len))
            if start_id >= 0:
                prefixes[start_id]["num_dependents"] += 1
            continue
        node = entry
        length = node.depth
        if node is not root and length > start_len and node.rows >= 2:
            prefix_id = len(prefixes)
            source = _first_row(node)
            prefixes.append(
                {
                    "prefix_id": prefix_id,
                    "parent_id": start_id,
                    "length": length,
                    "source_row": source,
                    "num_dependents": 0,
                    "keeps_logits": node.min_row_len == length,
                }
            )
            if start_id >= 0:
                prefixes[start_id]["num_dependents"] += 1
            items.append(PlanItem(True, prefix_id, start_id, start_len))
            start_id, start_len = prefix_id, length
        children = sorted(node.children, key=lambda c: -_priority(c, node, token_ids, max_tokens))
        todo.extend((c, start_id, start_len) for c in reversed(children))
    return ExecutionPlan(tuple(SharedPrefix(**p) for p in prefixes), tuple(items), unique)


def _first_row(node: _Node) -> int:
    cur: _Node | int = node
    while isinstance(cur, _Node):
        cur = cur.children[0]
    return cur
