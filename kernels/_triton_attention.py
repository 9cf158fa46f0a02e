"""Triton building blocks shared by the paged attention kernels (no launchers here).

A tile is BLOCK_M query rows against a range of context positions read through one block table of
the paged cache [num_blocks, block_size, num_kv_heads, head_dim]. GQA: the rows of a tile are
(query token, query head) pairs of ONE KV head, so all query heads of a KV head share each K/V load
and the score computation is a real matrix product (tl.dot). Online softmax in base 2: scores are
multiplied by scale * log2(e) and exponentiated with exp2; a row's log-sum-exp comes out as
m + log2(l) (base 2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


interpreting = triton_interpreting


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: full precision products (no TF32), so float32 results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cache dtypes {k_cache.dtype}/{v_cache.dtype}: both must be one of {SUPPORTED_DTYPES}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have equal strides and a contiguous last dimension")
    if k_cache.device != v_cache.device:
        raise ValueError("k_cache and v_cache are on different devices")


def check_queries(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor | None) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_heads, {head_dim}]; got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}")
    if q.stride(-1) != 1 or q.device != k_cache.device:
        raise ValueError("q must have a contiguous last dimension and live on the cache's device")
    if out is not None:
        if out.shape != q.shape or out.stride(-1) != 1 or out.device != q.device:
            raise ValueError(f"out must be like q {tuple(q.shape)} with a contiguous last dimension")


@triton.jit
def attend_tile(
    q,  # [BLOCK_M, BLOCK_D] queries of the tile (invalid rows zero)
    row_limit,  # [BLOCK_M] int: last context position each row may see (causal); ignored unless CAUSAL
    row_first,  # [BLOCK_M] int: first context position each row may see (its sliding window); ignored unless WINDOW
    k_cache_ptr,
    v_cache_ptr,
    stride_cb,
    stride_co,
    stride_ch,
    table_ptr,  # block table of the context read by this tile
    kv_head,
    kv_lo,  # first context position
    kv_hi,  # one past the last context position
    block_size,
    head_dim,
    qk_scale,  # scale * log2(e)
    softcap,  # soft-cap in base-2 score units (softcap * log2(e)); read only when SOFTCAP
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over positions [kv_lo, kv_hi): returns (acc, m, l) with acc unnormalised,
    m the running max of the base-2 scores and l the sum of exp2(score - m). With a sliding window
    the caller starts kv_lo at the tile's first visible position, so earlier blocks are not read.
    A row that sees no key returns l = 0 and m = -1e30."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    # a finite "minus infinity": exp2(m_i - m_new) never sees inf - inf, even for rows that see no key
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    head_off = kv_head.to(tl.int64) * stride_ch
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        kv_valid = pos < kv_hi
        block = tl.load(table_ptr + pos // block_size, mask=kv_valid, other=0).to(tl.int64)
        slot_off = block * stride_cb + (pos % block_size).to(tl.int64) * stride_co + head_off
        kt = tl.load(
            k_cache_ptr + slot_off[None, :] + offs_d[:, None],
            mask=kv_valid[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            # softcap * tanh(s / softcap), tanh written with exp (inf for large s gives 1, 0 gives -1):
            # capping the natural-log score and then scaling by log2(e) is the same as capping the
            # base-2 score at softcap * log2(e)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        visible = kv_valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= row_limit[:, None])
        if WINDOW:
            visible = visible & (pos[None, :] >= row_first[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + slot_off[:, None] + offs_d[None, :],
            mask=kv_valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i
