"""Random paged-KV scenarios shared by the kernel tests (plain helpers, no pytest fixtures).

Caches start as NaN everywhere; only the slots a scenario's contexts cover are written, so any
kernel that reads a slot it should not poisons its output and fails the comparison.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels.paged_attention import build_paged_batch, paged_attention_reference


@dataclass
class DecodeScenario:
    q: torch.Tensor  # [num_tokens, H, D]; decode rows at query_rows, other rows are filler
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_rows: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    group_ids: list[int | None]
    prefix_lens: list[int]
    block_size: int
    scale: float

    def expected(self) -> torch.Tensor:
        """Plain paged attention of every decode row over its whole context; rows of q order."""
        n = len(self.query_rows)
        idx = torch.tensor(self.query_rows, dtype=torch.int64)
        batch = build_paged_batch([1] * n, self.context_lens, self.block_tables, self.block_size, torch.device("cpu"))
        ref = paged_attention_reference(self.q[idx], self.k_cache, self.v_cache, batch, self.scale)
        out = torch.zeros_like(self.q)
        out[idx] = ref
        return out


def _nan_cache(num_blocks: int, block_size: int, kvh: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((num_blocks, block_size, kvh, d), float("nan"), dtype=dtype)


def make_decode_scenario(
    seed: int,
    groups: list[tuple[int, list[int]]],  # (prefix_len, [suffix_len of each member])
    ungrouped: list[int],  # context lengths of rows without a group
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    extra_q_rows: int = 3,
    spare_blocks: int = 3,
) -> DecodeScenario:
    """Groups share their full prefix blocks; the partial last prefix block is copied into each
    member's own block (copy on write); block ids are shuffled; decode rows are scattered in q."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    bs = block_size

    def nblocks(n: int) -> int:
        return -(-n // bs)

    need = 0
    for p, suffixes in groups:
        need += p // bs
        need += sum(nblocks(p + s) - p // bs for s in suffixes)
    need += sum(nblocks(c) for c in ungrouped)
    num_blocks = need + spare_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    k_cache = _nan_cache(num_blocks, bs, num_kv_heads, head_dim, dtype)
    v_cache = _nan_cache(num_blocks, bs, num_kv_heads, head_dim, dtype)
    kf = k_cache.view(-1, num_kv_heads, head_dim)
    vf = v_cache.view(-1, num_kv_heads, head_dim)

    def rand(n: int) -> torch.Tensor:
        return torch.randn((n, num_kv_heads, head_dim), generator=g).to(dtype)

    def write(table: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = torch.arange(start, start + k.shape[0])
        slots = torch.tensor(table, dtype=torch.int64)[pos // bs] * bs + pos % bs
        kf[slots] = k
        vf[slots] = v

    context_lens: list[int] = []
    tables: list[list[int]] = []
    group_ids: list[int | None] = []
    prefix_lens: list[int] = []
    for gi, (p, suffixes) in enumerate(groups):
        shared = [ids.pop() for _ in range(p // bs)]
        pk, pv = rand(p), rand(p)
        write(shared, 0, pk[: len(shared) * bs], pv[: len(shared) * bs])
        for s in suffixes:
            table = shared + [ids.pop() for _ in range(nblocks(p + s) - len(shared))]
            full = len(shared) * bs
            write(table, full, pk[full:], pv[full:])  # this member's copy of the partial prefix block
            write(table, p, rand(s), rand(s))
            context_lens.append(p + s)
            tables.append(table)
            group_ids.append(gi)
            prefix_lens.append(p)
    for c in ungrouped:
        table = [ids.pop() for _ in range(nblocks(c))]
        write(table, 0, rand(c), rand(c))
        context_lens.append(c)
        tables.append(table)
        group_ids.append(None)
        prefix_lens.append(0)

    n = len(context_lens)
    num_tokens = n + extra_q_rows
    query_rows = list(range(num_tokens))
    rng.shuffle(query_rows)
    query_rows = query_rows[:n]
    # interleave rows of different groups so the builder's reordering is exercised
    order = list(range(n))
    rng.shuffle(order)
    q = torch.randn((num_tokens, num_heads, head_dim), generator=g).to(dtype)
    return DecodeScenario(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        query_rows=[query_rows[i] for i in order],
        context_lens=[context_lens[i] for i in order],
        block_tables=[tables[i] for i in order],
        group_ids=[group_ids[i] for i in order],
        prefix_lens=[prefix_lens[i] for i in order],
        block_size=bs,
        scale=head_dim**-0.5,
    )


@dataclass
class PrefillScenario:
    q: torch.Tensor  # [num_tokens, H, D], sequences' query chunks back to back
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    scale: float

    def expected(self) -> torch.Tensor:
        batch = build_paged_batch(self.query_lens, self.context_lens, self.block_tables, self.block_size, torch.device("cpu"))
        return paged_attention_reference(self.q, self.k_cache, self.v_cache, batch, self.scale)


def make_prefill_scenario(
    seed: int,
    spans: list[tuple[int, int]],  # (query_len, context_len) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    spare_blocks: int = 2,
) -> PrefillScenario:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    bs = block_size
    need = [-(-c // bs) + rng.randint(0, 1) for _, c in spans]  # tables may be longer than needed
    num_blocks = sum(need) + spare_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    k_cache = _nan_cache(num_blocks, bs, num_kv_heads, head_dim, dtype)
    v_cache = _nan_cache(num_blocks, bs, num_kv_heads, head_dim, dtype)
    kf = k_cache.view(-1, num_kv_heads, head_dim)
    vf = v_cache.view(-1, num_kv_heads, head_dim)
    tables = []
    for (ql, c), nb in zip(spans, need):
        assert 0 < ql <= c
        table = [ids.pop() for _ in range(nb)]
        pos = torch.arange(c)
        slots = torch.tensor(table, dtype=torch.int64)[pos // bs] * bs + pos % bs
        kf[slots] = torch.randn((c, num_kv_heads, head_dim), generator=g).to(dtype)
        vf[slots] = torch.randn((c, num_kv_heads, head_dim), generator=g).to(dtype)
        tables.append(table)
    t = sum(ql for ql, _ in spans)
    q = torch.randn((t, num_heads, head_dim), generator=g).to(dtype)
    return PrefillScenario(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        query_lens=[ql for ql, _ in spans],
        context_lens=[c for _, c in spans],
        block_tables=tables,
        block_size=bs,
        scale=head_dim**-0.5,
    )


def dense_attention(
    q: torch.Tensor,  # [num_heads, head_dim]: one query token
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: list[int],
    query_pos: int,
    scale: float,
    window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The definition, one query at a time in float64: the query at `query_pos` attends to the keys
    at positions k with k <= query_pos and query_pos - k < window (transformers' sliding window);
    scaled scores soft-capped to softcap * tanh(score / softcap) when `softcap` is given (Gemma 2)."""
    bs, kvh, d = k_cache.shape[1:]
    keys = [k for k in range(query_pos + 1) if window is None or query_pos - k < window]
    slots = torch.tensor([table[k // bs] * bs + k % bs for k in keys], dtype=torch.int64)
    k = k_cache.reshape(-1, kvh, d)[slots].double()  # [n, kvh, d]
    v = v_cache.reshape(-1, kvh, d)[slots].double()
    ratio = q.shape[0] // kvh
    k, v = k.repeat_interleave(ratio, dim=1), v.repeat_interleave(ratio, dim=1)  # [n, heads, d]
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("hn,nhd->hd", weights, v)


def dense_prefill(sc: PrefillScenario, window: int | None, softcap: float | None = None) -> torch.Tensor:
    """`dense_attention` of every query of a prefill scenario, float64, q's row order."""
    out, row = [], 0
    for ql, c, table in zip(sc.query_lens, sc.context_lens, sc.block_tables):
        for j in range(ql):
            out.append(dense_attention(sc.q[row + j], sc.k_cache, sc.v_cache, table, c - ql + j, sc.scale, window,
                                       softcap))
        row += ql
    return torch.stack(out)


def dense_decode(sc: DecodeScenario, window: int | None, softcap: float | None = None) -> torch.Tensor:
    """`dense_attention` of every decode row of a decode scenario, float64, rows of q order
    (rows that are not decode rows: zeros)."""
    out = torch.zeros(sc.q.shape, dtype=torch.float64)
    for r, c, table in zip(sc.query_rows, sc.context_lens, sc.block_tables):
        out[r] = dense_attention(sc.q[r], sc.k_cache, sc.v_cache, table, c - 1, sc.scale, window, softcap)
    return out
