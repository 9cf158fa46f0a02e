"""Varlen attention over the paged KV cache (Triton kernel, launcher, metadata builder).

Meaning: exactly `kernels.paged_attention.paged_attention_reference`. Queries come as one flat batch
without padding; sequence i owns q[query_start[i] : query_start[i] + query_len[i]], the last
query_len[i] tokens of its context of context_len[i] tokens (already stored in the cache), and each
query attends causally to its context up to and including itself (and, with a sliding window w, to
no key at or before its position - w: a tile's loop starts at its first row's first visible key). A
decode row is a sequence with query_len 1, so this kernel serves every row of a step (the non-shared
path).

Work split: the grid is (tiles, num_kv_heads). A tile is up to BLOCK_M rows of one sequence, a row
being a (query token, query head of this KV head) pair, so GQA shares every K/V load among the query
heads of a KV head and the scores are one tl.dot. Sequences with few rows (decode) use small tiles
(BLOCK_M_SMALL = max(16, heads per KV head)); the others use wide tiles. Both kinds run in the same
launch. Online softmax in base 2 (exp2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels._triton_attention import (
    LOG2E,
    attend_tile,
    check_cache,
    check_queries,
    dot_precision,
    interpreting,
)
from kernels.host_tensors import to_device
from kernels.paged_attention import paged_attention_reference

__all__ = ["PagedPrefillMetadata", "build_paged_prefill_metadata", "paged_prefill", "paged_attention_reference"]

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class PagedPrefillMetadata:
    """Per-step tensors for `paged_prefill` (built on the host by `build_paged_prefill_metadata`)."""

    query_starts: torch.Tensor  # [S] int32: first row of q of each sequence
    query_lens: torch.Tensor  # [S] int32
    context_lens: torch.Tensor  # [S] int32 (query tokens included)
    block_tables: torch.Tensor  # [S, max_blocks] int32, 0-padded
    tile_seq: torch.Tensor  # [T] int32: sequence of each tile (wide tiles first)
    tile_row0: torch.Tensor  # [T] int32: first (token * heads_per_kv + head) row of the tile
    num_wide_tiles: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    block_m: int  # rows of a wide tile
    block_m_small: int  # rows of a small tile
    host_query_starts: tuple[int, ...]
    host_query_lens: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return int(self.tile_seq.shape[0])


def default_block_m() -> int:
    return 16 if interpreting() else 64


def build_paged_prefill_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str,
    num_heads: int,
    num_kv_heads: int,
    query_starts: Sequence[int] | None = None,
    block_m: int | None = None,
) -> PagedPrefillMetadata:
    """Host-side metadata, once per step. Arguments as `build_paged_batch`, plus the model's head
    counts (tiles fold the query heads of a KV head into rows) and optionally where each sequence's
    queries start in q (default: back to back from row 0, in the given order), so a subset of a
    step's sequences can be covered."""
    n = len(query_lens)
    if not (len(context_lens) == len(block_tables) == n):
        raise ValueError("query_lens, context_lens and block_tables differ in length")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if query_starts is None:
        starts, s = [], 0
        for ql in query_lens:
            starts.append(s)
            s += int(ql)
    else:
        if len(query_starts) != n:
            raise ValueError("query_starts differs in length from query_lens")
        starts = [int(x) for x in query_starts]
    for ql, c, table in zip(query_lens, context_lens, block_tables):
        if not 0 < ql <= c <= len(table) * block_size:
            raise ValueError(f"bad span: {ql} queries, context {c}, {len(table)} blocks of {block_size}")
    ratio = num_heads // num_kv_heads
    bm = block_m or default_block_m()
    bm_small = max(16, triton.next_power_of_2(ratio))
    wide: list[tuple[int, int, int]] = []  # (-context, seq, row0): longest first
    small: list[tuple[int, int, int]] = []
    for i, (ql, c) in enumerate(zip(query_lens, context_lens)):
        rows = int(ql) * ratio
        if rows <= bm_small:
            small.append((-int(c), i, 0))
        else:
            wide.extend((-int(c), i, r0) for r0 in range(0, rows, bm))
    wide.sort()
    small.sort()
    tiles = wide + small
    width = max((-(-int(c) // block_size) for c in context_lens), default=1)
    tables = torch.zeros((n, max(width, 1)), dtype=torch.int32)
    for i, (c, table) in enumerate(zip(context_lens, block_tables)):
        nb = -(-int(c) // block_size)
        tables[i, :nb] = torch.tensor(list(table[:nb]), dtype=torch.int32)

    def t32(xs: Sequence[int]) -> torch.Tensor:
        return to_device(list(xs), torch.int32, device)

    return PagedPrefillMetadata(
        query_starts=t32(starts),
        query_lens=t32([int(x) for x in query_lens]),
        context_lens=t32([int(x) for x in context_lens]),
        block_tables=to_device(tables, torch.int32, device),
        tile_seq=t32([t[1] for t in tiles]),
        tile_row0=t32([t[2] for t in tiles]),
        num_wide_tiles=len(wide),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        block_m=bm,
        block_m_small=bm_small,
        host_query_starts=tuple(starts),
        host_query_lens=tuple(int(x) for x in query_lens),
    )


@triton.jit
def _prefill_tile(
    tile,
    kv_head,
    q_ptr,
    out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_start_ptr,
    q_len_ptr,
    ctx_len_ptr,
    table_ptr,
    tile_seq_ptr,
    tile_row0_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_tbl,
    qk_scale,
    window,
    softcap,
    RATIO: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    ctx_len = tl.load(ctx_len_ptr + seq)
    n_rows = q_len * RATIO
    f = row0 + tl.arange(0, BLOCK_M)
    valid = f < n_rows
    tok = tl.where(valid, f // RATIO, 0)
    head = kv_head * RATIO + f % RATIO
    q_row = (q_start + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    pos = ctx_len - q_len + tok  # context position of each row's query token
    last_tok = (tl.minimum(row0 + BLOCK_M, n_rows) - 1) // RATIO
    kv_hi = ctx_len - q_len + last_tok + 1
    if WINDOW:
        # the tile's first row sees the earliest keys; blocks before them are not read
        kv_lo = tl.maximum(ctx_len - q_len + row0 // RATIO - window + 1, 0)
    else:
        kv_lo = 0
    acc, m_i, l_i = attend_tile(
        q, pos, pos - window + 1, k_cache_ptr, v_cache_ptr, stride_cb, stride_co, stride_ch,
        table_ptr + seq.to(tl.int64) * stride_tbl, kv_head, kv_lo, kv_hi, BLOCK_SIZE, HEAD_DIM, qk_scale,
        softcap, BLOCK_M, BLOCK_N, BLOCK_D, True, WINDOW, SOFTCAP, DOT_PRECISION,
    )
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_start_ptr,
    q_len_ptr,
    ctx_len_ptr,
    table_ptr,
    tile_seq_ptr,
    tile_row0_ptr,
    num_wide_tiles,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_tbl,
    qk_scale,
    window,
    softcap,
    RATIO: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_M_SMALL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tile < num_wide_tiles:
        _prefill_tile(
            tile, kv_head, q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
            table_ptr, tile_seq_ptr, tile_row0_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_cb, stride_co, stride_ch, stride_tbl, qk_scale, window, softcap,
            RATIO, BLOCK_SIZE, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, WINDOW, SOFTCAP, DOT_PRECISION,
        )
    else:
        _prefill_tile(
            tile, kv_head, q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
            table_ptr, tile_seq_ptr, tile_row0_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_cb, stride_co, stride_ch, stride_tbl, qk_scale, window, softcap,
            RATIO, BLOCK_SIZE, HEAD_DIM, BLOCK_M_SMALL, BLOCK_N, BLOCK_D, WINDOW, SOFTCAP, DOT_PRECISION,
        )


def paged_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: PagedPrefillMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the sequences in `meta` over their cached context (Triton), within the
    sliding `window` when given (None: the whole context), scores soft-capped to
    softcap * tanh(score / softcap) when `softcap` is given.

    Writes the rows of q covered by `meta` into `out` (a new uninitialised tensor like q when None;
    rows not covered are left as they are) and returns it.
    """
    check_cache(k_cache, v_cache)
    check_queries(q, k_cache, out)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if (q.shape[1], num_kv_heads, k_cache.shape[1]) != (meta.num_heads, meta.num_kv_heads, meta.block_size):
        raise ValueError("metadata was built for other head counts or another block size")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if meta.tile_seq.device != q.device:
        raise ValueError("metadata lives on another device than q")
    if meta.host_query_lens and max(s + n for s, n in zip(meta.host_query_starts, meta.host_query_lens)) > q.shape[0]:
        raise ValueError("metadata covers rows beyond q")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be at least 1 token, not {window}")
    if out is None:
        out = torch.empty_like(q)
    if meta.num_tiles == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    bn = block_n or (16 if interpreting() else (64 if block_d <= 128 else 32))
    _paged_prefill_kernel[(meta.num_tiles, num_kv_heads)](
        q, out, k_cache, v_cache,
        meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables,
        meta.tile_seq, meta.tile_row0, meta.num_wide_tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        scale * LOG2E,
        window or 0,
        (softcap or 1.0) * LOG2E,
        RATIO=meta.num_heads // meta.num_kv_heads,
        BLOCK_SIZE=meta.block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=meta.block_m,
        BLOCK_M_SMALL=meta.block_m_small,
        BLOCK_N=bn,
        BLOCK_D=block_d,
        WINDOW=window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4 if block_d <= 128 else 8,
        num_stages=2,
    )
    return out
