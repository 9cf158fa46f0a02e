"""Shared-prefix decode attention, the BatchLLM kernel (Triton kernels, launcher, planner).

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` (plain attention
of each decode query over its whole context), for the rows and groups of a `SharedPrefixBatch`.

One launch, grid (tiles, num_kv_heads), covers two kinds of tiles:
  group tiles:   up to BLOCK_M_GROUP rows (member, query head of this KV head) of ONE group against a
                 range of the group's prefix positions read through ONE copy of the prefix block
                 table: the scores are a [rows, BLOCK_N] tl.dot, so tensor cores do the work and each
                 prefix block is read once per group (per row tile of the group, which is one tile
                 for up to BLOCK_M_GROUP / heads_per_kv members). Long prefixes are split along the
                 KV axis into `kv_split`-token ranges (more tiles, more parallelism).
  request tiles: the query heads of one row's KV head (BLOCK_M_ROW = max(16, heads_per_kv) rows)
                 against a range of the row's own positions [suffix_start, context_len), through
                 its own block table; long suffixes (and whole contexts of rows without a group) are
                 split the same way.
Each tile writes its rows' normalised partial output and base-2 log-sum-exp into a scratch buffer;
a second (merge) kernel combines the parts of each row. A row whose attention is a single tile
(e.g. a row without a group whose context fits one split) is written directly to the output and
skips the merge.

Sliding windows (a launch argument, per layer; the plan does not depend on it): every tile masks
each of its rows by that row's own position (context_len - 1), group tiles included, and starts its
loop at the first position any of its rows sees, so blocks before every row's window are not read.
A tile none of whose rows sees a key yields an empty part (weight 0 in the merge).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
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
from kernels.shared_prefix_attention import (
    SharedPrefixBatch,
    build_shared_prefix_batch,
    shared_prefix_decode_reference,
)

__all__ = [
    "SharedPrefixDecodePlan",
    "build_shared_prefix_batch",
    "plan_shared_prefix_decode",
    "shared_prefix_decode",
    "shared_prefix_decode_reference",
]

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class SharedPrefixDecodePlan:
    """A `SharedPrefixBatch` cut into tiles for `shared_prefix_decode` (built on the host per step)."""

    batch: SharedPrefixBatch
    tile_f0: torch.Tensor  # [T] int32: first row (decode_row * heads_per_kv + head) of the tile
    tile_f1: torch.Tensor  # [T] int32: one past its last row
    tile_table: torch.Tensor  # [T] int32: group (group tiles) or decode row (request tiles) whose table is read
    tile_kv_lo: torch.Tensor  # [T] int32: context positions [lo, hi) of the tile
    tile_kv_hi: torch.Tensor  # [T] int32
    tile_part: torch.Tensor  # [T] int32: part index within each row's parts; -1: write the output directly
    row_part_start: torch.Tensor  # [R] int32: first part slot of each row that is merged
    row_num_parts: torch.Tensor  # [R] int32
    merge_rows: torch.Tensor  # [M] int32: rows whose parts the merge kernel combines
    group_tile_count: torch.Tensor  # [1] int32: num_group_tiles, read by the kernel (CUDA-graph safe)
    num_group_tiles: int
    num_parts: int
    num_heads: int
    num_kv_heads: int
    block_m_group: int
    block_m_row: int
    kv_split: int

    @property
    def num_tiles(self) -> int:
        return int(self.tile_f0.shape[0])


def plan_shared_prefix_decode(
    batch: SharedPrefixBatch,
    num_heads: int,
    num_kv_heads: int,
    block_m: int | None = None,
    kv_split: int | None = None,
) -> SharedPrefixDecodePlan:
    """Cut the batch into group tiles and request tiles (host ints only, no device sync).

    block_m: rows of a group tile (a power of two >= 16; default on a GPU: the rows of the largest
    group rounded up to a power of two, between 16 and 128; 16 in the interpreter); kv_split:
    context positions per tile (default 512 on a GPU, 64 in the interpreter).
    """
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    ratio = num_heads // num_kv_heads
    ctx, sstart = batch.host_context_lens, batch.host_suffix_starts
    starts, plens = batch.host_group_row_starts, batch.host_prefix_lens
    if block_m:
        bm = block_m
    elif interpreting():
        bm = 16
    else:
        largest = max((starts[g + 1] - starts[g] for g in range(len(plens))), default=1)
        bm = min(128, max(16, triton.next_power_of_2(largest * ratio)))
    split = kv_split or (64 if interpreting() else 512)
    if bm < 16 or bm & (bm - 1) or split < 1:
        raise ValueError("block_m must be a power of two >= 16 and kv_split positive")
    num_rows = len(ctx)
    # Per-row arithmetic in numpy: hundreds of rows per step, planned on the host every step.
    ctx_a = np.asarray(ctx, dtype=np.int64)
    sstart_a = np.asarray(sstart, dtype=np.int64)
    group_sizes = np.diff(np.asarray(starts, dtype=np.int64))
    group_splits = -(-np.asarray(plens, dtype=np.int64) // split)  # [G] prefix tiles per row tile
    grouped_rows = int(starts[-1])
    n_pre = np.zeros(num_rows, dtype=np.int64)
    n_pre[:grouped_rows] = np.repeat(group_splits, group_sizes)
    n_suf = -(-(ctx_a - sstart_a) // split)
    n_parts = n_pre + n_suf
    # A group's tiles write the output directly only when they are the rows' only parts.
    if len(plens):
        suffix_tiles = np.add.reduceat(n_suf[:grouped_rows], np.asarray(starts[:-1], dtype=np.int64))
        direct_group = (group_splits == 1) & (suffix_tiles == 0)
    else:
        direct_group = np.zeros(0, dtype=bool)
    merged = n_parts >= 2
    merged[:grouped_rows] = ~np.repeat(direct_group, group_sizes)
    part_counts = np.where(merged, n_parts, 0)
    part_start = np.where(merged, np.cumsum(part_counts) - part_counts, 0)  # 0: rows never merged
    total = int(part_counts.sum())
    # group tiles (few: per group, row tiles x prefix splits), sorted largest first:
    # (sort key, f0, f1, table, lo, hi, part)
    group_tiles: list[tuple[int, int, int, int, int, int, int]] = []
    for g, p in enumerate(plens):
        r0, r1 = starts[g], starts[g + 1]
        direct = bool(direct_group[g])
        for f0 in range(r0 * ratio, r1 * ratio, bm):
            f1 = min(f0 + bm, r1 * ratio)
            for s in range(int(group_splits[g])):
                lo, hi = s * split, min(p, (s + 1) * split)
                group_tiles.append((-(hi - lo) * (f1 - f0), f0, f1, g, lo, hi, -1 if direct else s))
    group_tiles.sort()
    num_group = len(group_tiles)
    group_cols = np.fromiter(chain.from_iterable(group_tiles), dtype=np.int64, count=7 * num_group)
    group_cols = group_cols.reshape(num_group, 7)[:, 1:].T  # [6, G tiles]
    # request tiles: row r's own positions [suffix_start, context) in kv_split pieces, longest first
    tile_row = np.repeat(np.arange(num_rows, dtype=np.int64), n_suf)
    piece = np.arange(len(tile_row), dtype=np.int64) - np.repeat(np.cumsum(n_suf) - n_suf, n_suf)
    lo = sstart_a[tile_row] + piece * split
    hi = np.minimum(ctx_a[tile_row], lo + split)
    part = np.where(merged[tile_row], n_pre[tile_row] + piece, -1)
    order = np.lexsort((lo, tile_row, lo - hi))
    tile_row, lo, hi, part = tile_row[order], lo[order], hi[order], part[order]
    row_cols = np.stack([tile_row * ratio, (tile_row + 1) * ratio, tile_row, lo, hi, part])  # [6, R tiles]
    num_tiles = num_group + len(tile_row)
    merge_rows = np.flatnonzero(merged)
    # every int32 array of the plan in one host buffer, so one copy moves them to the device
    packed = np.concatenate([
        np.concatenate([group_cols, row_cols], axis=1).reshape(-1), part_start, n_parts, merge_rows, [num_group],
    ]).astype(np.int32)
    flat = to_device(torch.from_numpy(packed), torch.int32, batch.query_index.device)
    cols = flat[: 6 * num_tiles].view(6, num_tiles)
    rest = flat[6 * num_tiles :].split([num_rows, num_rows, len(merge_rows), 1])

    return SharedPrefixDecodePlan(
        batch=batch,
        tile_f0=cols[0],
        tile_f1=cols[1],
        tile_table=cols[2],
        tile_kv_lo=cols[3],
        tile_kv_hi=cols[4],
        tile_part=cols[5],
        row_part_start=rest[0],
        row_num_parts=rest[1],
        merge_rows=rest[2],
        group_tile_count=rest[3],
        num_group_tiles=num_group,
        num_parts=total,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        block_m_group=bm,
        block_m_row=max(16, triton.next_power_of_2(ratio)),
        kv_split=split,
    )


@triton.jit
def _decode_tile(
    tile,
    kv_head,
    table_ptr,
    q_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    k_cache_ptr,
    v_cache_ptr,
    query_index_ptr,
    context_lens_ptr,
    row_part_start_ptr,
    tile_f0_ptr,
    tile_f1_ptr,
    tile_lo_ptr,
    tile_hi_ptr,
    tile_part_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    qk_scale,
    window,
    softcap,
    NUM_HEADS: tl.constexpr,
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
    f0 = tl.load(tile_f0_ptr + tile)
    f1 = tl.load(tile_f1_ptr + tile)
    kv_lo = tl.load(tile_lo_ptr + tile)
    kv_hi = tl.load(tile_hi_ptr + tile)
    part = tl.load(tile_part_ptr + tile)
    f = f0 + tl.arange(0, BLOCK_M)
    valid = f < f1
    row = tl.where(valid, f // RATIO, f0 // RATIO)  # decode row of each tile row
    head = kv_head * RATIO + f % RATIO
    q_row = tl.load(query_index_ptr + row).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    if WINDOW:
        # a row at position context_len - 1 sees positions from context_len - window on; the tile
        # starts at the earliest of its rows' (rows of different members of a group differ)
        row_first = tl.load(context_lens_ptr + row) - window
        kv_lo = tl.maximum(kv_lo, tl.min(tl.where(valid, row_first, kv_hi), 0))
    else:
        row_first = f
    acc, m_i, l_i = attend_tile(
        q, f, row_first, k_cache_ptr, v_cache_ptr, stride_cb, stride_co, stride_ch, table_ptr, kv_head, kv_lo, kv_hi,
        BLOCK_SIZE, HEAD_DIM, qk_scale, softcap, BLOCK_M, BLOCK_N, BLOCK_D, False, WINDOW, SOFTCAP, DOT_PRECISION,
    )
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if part < 0:
        tl.store(out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        slot = (tl.load(row_part_start_ptr + row) + part).to(tl.int64) * NUM_HEADS + head
        tl.store(part_out_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
        tl.store(part_lse_ptr + slot, m_i + tl.log2(safe_l), mask=valid)


@triton.jit
def _shared_prefix_decode_kernel(
    q_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    k_cache_ptr,
    v_cache_ptr,
    query_index_ptr,
    context_lens_ptr,
    row_part_start_ptr,
    prefix_table_ptr,
    row_table_ptr,
    table_starts_ptr,
    tile_f0_ptr,
    tile_f1_ptr,
    tile_table_ptr,
    tile_lo_ptr,
    tile_hi_ptr,
    tile_part_ptr,
    tile_base,
    group_tile_count_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_ptbl,
    stride_rtbl,
    qk_scale,
    window,
    softcap,
    NUM_HEADS: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M_GROUP: tl.constexpr,
    BLOCK_M_ROW: tl.constexpr,
    BLOCK_N_GROUP: tl.constexpr,
    BLOCK_N_ROW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MODE: tl.constexpr,  # 0: group and request tiles (fused launch); 1: group tiles only; 2: request tiles only
):
    tile = tl.program_id(0) + tile_base
    kv_head = tl.program_id(1)
    table = tl.load(tile_table_ptr + tile).to(tl.int64)
    if MODE == 1:
        is_group = True
    elif MODE == 2:
        is_group = False
    else:
        is_group = tile < tl.load(group_tile_count_ptr)
    if is_group:
        _decode_tile(
            tile, kv_head, prefix_table_ptr + table * stride_ptbl, q_ptr, out_ptr, part_out_ptr, part_lse_ptr,
            k_cache_ptr, v_cache_ptr, query_index_ptr, context_lens_ptr, row_part_start_ptr,
            tile_f0_ptr, tile_f1_ptr, tile_lo_ptr, tile_hi_ptr, tile_part_ptr,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_ch, qk_scale, window, softcap,
            NUM_HEADS, RATIO, BLOCK_SIZE, HEAD_DIM, BLOCK_M_GROUP, BLOCK_N_GROUP, BLOCK_D, WINDOW, SOFTCAP, DOT_PRECISION,
        )
    else:
        # a row's table starts at block table_starts[row]: shift the pointer so position // block_size indexes it
        first_block = tl.load(table_starts_ptr + table).to(tl.int64)
        _decode_tile(
            tile, kv_head, row_table_ptr + table * stride_rtbl - first_block, q_ptr, out_ptr, part_out_ptr, part_lse_ptr,
            k_cache_ptr, v_cache_ptr, query_index_ptr, context_lens_ptr, row_part_start_ptr,
            tile_f0_ptr, tile_f1_ptr, tile_lo_ptr, tile_hi_ptr, tile_part_ptr,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_ch, qk_scale, window, softcap,
            NUM_HEADS, RATIO, BLOCK_SIZE, HEAD_DIM, BLOCK_M_ROW, BLOCK_N_ROW, BLOCK_D, WINDOW, SOFTCAP, DOT_PRECISION,
        )


@triton.jit
def _merge_parts_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    query_index_ptr,
    merge_rows_ptr,
    row_part_start_ptr,
    row_num_parts_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.load(merge_rows_ptr + tl.program_id(0))
    first = tl.load(row_part_start_ptr + row)
    count = tl.load(row_num_parts_ptr + row)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    mask = h_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    m = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for j in range(first, first + count):
        base = offs_h.to(tl.int64) + j * NUM_HEADS
        lse = tl.load(part_lse_ptr + base, mask=h_mask, other=-1.0e30)
        o = tl.load(part_out_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        s = s * alpha + w
        m = m_new
    q_row = tl.load(query_index_ptr + row).to(tl.int64)
    o = acc / tl.where(s > 0, s, 1.0)[:, None]
    # count == 0: a padding entry of a CUDA-graph plan (its row is a dummy): write nothing.
    # (the test is broadcast to a block first: scalar & block masks are int32 in the interpreter)
    has_parts = (tl.zeros([BLOCK_H], dtype=tl.int32) + count) > 0
    tl.store(out_ptr + q_row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask & has_parts[:, None])


def shared_prefix_decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: SharedPrefixDecodePlan,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    fused: bool = True,
    block_n: int | None = None,
    block_n_row: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton shared-prefix decode attention: writes rows plan.batch.query_index of `out`
    (allocated like q, zero-filled, when None; other rows are left untouched) and returns it.

    fused=True: group and request tiles in one launch (then the merge); fused=False: two launches,
    each compiled for one kind of tile (lower register/shared-memory footprint for request tiles).
    block_n / block_n_row: context positions per inner step of group / request tiles; num_warps,
    num_stages: Triton launch options (defaults picked from the tile sizes). window: the layer's
    sliding window (None: each query sees its whole context). softcap: scores soft-capped to
    softcap * tanh(score / softcap) (None: not capped).
    """
    check_cache(k_cache, v_cache)
    check_queries(q, k_cache, out)
    batch = plan.batch
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if (q.shape[1], num_kv_heads, k_cache.shape[1]) != (plan.num_heads, plan.num_kv_heads, batch.block_size):
        raise ValueError("plan was built for other head counts or another block size")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if batch.query_index.device != q.device:
        raise ValueError("plan lives on another device than q")
    if batch.host_query_index and max(batch.host_query_index) >= q.shape[0]:
        raise ValueError("plan covers rows beyond q")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be at least 1 token, not {window}")
    if out is None:
        out = torch.zeros_like(q)
    if plan.num_tiles == 0:
        return out
    num_heads = q.shape[1]
    parts = max(plan.num_parts, 1)
    part_out = torch.empty((parts, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((parts, num_heads), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    interp = interpreting()
    bn_group = block_n or (16 if interp else (64 if block_d <= 128 else 32))
    bn_row = block_n_row or (16 if interp else (64 if block_d <= 128 else 32))
    big_group = plan.block_m_group >= 128 or block_d > 128
    args = (
        q, out, part_out, part_lse, k_cache, v_cache,
        batch.query_index, batch.context_lens, plan.row_part_start, batch.prefix_block_tables, batch.block_tables, batch.table_starts,
        plan.tile_f0, plan.tile_f1, plan.tile_table, plan.tile_kv_lo, plan.tile_kv_hi, plan.tile_part,
    )
    strides = (
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        batch.prefix_block_tables.stride(0), batch.block_tables.stride(0),
        scale * LOG2E, window or 0, (softcap or 1.0) * LOG2E,
    )
    consts = dict(
        NUM_HEADS=num_heads,
        RATIO=num_heads // num_kv_heads,
        BLOCK_SIZE=batch.block_size,
        HEAD_DIM=head_dim,
        BLOCK_M_GROUP=plan.block_m_group,
        BLOCK_M_ROW=plan.block_m_row,
        BLOCK_N_GROUP=bn_group,
        BLOCK_N_ROW=bn_row,
        BLOCK_D=block_d,
        WINDOW=window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_stages=num_stages or 2,
    )
    g = plan.num_group_tiles
    launches = [(0, plan.num_tiles, 0, big_group)] if fused else [(1, g, 0, big_group), (2, plan.num_tiles - g, g, block_d > 128)]
    for mode, n, base, big in launches:
        if n:
            _shared_prefix_decode_kernel[(n, num_kv_heads)](
                *args, base, plan.group_tile_count, *strides, MODE=mode, num_warps=num_warps or (8 if big else 4), **consts
            )
    num_merge = int(plan.merge_rows.shape[0])
    if num_merge:
        _merge_parts_kernel[(num_merge,)](
            out, part_out, part_lse, batch.query_index, plan.merge_rows, plan.row_part_start, plan.row_num_parts,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4,
        )
    return out
