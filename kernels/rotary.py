"""Rotary position embedding of q and k in one launch, in place (Triton kernel, launcher, reference).

q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim], typically views of
the fused qkv projection output (any token and head strides, contiguous last dimension); they are
rotated in place, so the separate cos/sin gather, casts, rotate_half copies and output tensors of
`engine.models.rope.apply_rope` disappear. Token t uses row positions[t] of the cos/sin table
[max_positions, 2, head_dim] float32 (`engine.models.rope.rope_cache`: cos at [:, 0], sin at [:, 1]):

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[half:], x[:half])

computed in float32 from the float32 table and rounded once to x's dtype. `apply_rope` rounds
cos/sin to x's dtype first and rounds each product, so in 16-bit dtypes the two differ by a few
units in the last place (this kernel is the more accurate one); in float32 they agree to rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_attention import SUPPORTED_DTYPES

__all__ = ["rotary_embedding", "rotary_embedding_reference"]

_TILE_ELEMS = 2048  # (token, head, half-dim) elements of q per program: several tokens for small models


@triton.jit
def _rotate_heads(
    ptr, tok, tok_mask, stride_t, stride_h, num_heads, half, cos_lo, cos_hi, sin_lo, sin_hi,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # tok: [BLOCK_T] token indices; cos_*/sin_*: [BLOCK_T, BLOCK_HALF] float32 (lo/hi half of head_dim)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    off = tok[:, None, None] * stride_t + heads[None, :, None] * stride_h + dims[None, None, :]
    mask = tok_mask[:, None, None] & (heads[None, :, None] < num_heads) & (dims[None, None, :] < half)
    x1 = tl.load(ptr + off, mask=mask, other=0.0)  # [BLOCK_T, BLOCK_H, BLOCK_HALF]
    x2 = tl.load(ptr + off + half, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    out1 = a * cos_lo[:, None, :] - b * sin_lo[:, None, :]
    out2 = b * cos_hi[:, None, :] + a * sin_hi[:, None, :]
    tl.store(ptr + off, out1.to(x1.dtype), mask=mask)
    tl.store(ptr + off + half, out2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    num_tokens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cp,
    stride_cs,  # cos -> sin
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    pos = tl.load(pos_ptr + tok, mask=tok_mask, other=0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    c_off = pos[:, None] * stride_cp + dims[None, :]  # [BLOCK_T, BLOCK_HALF]
    c_mask = tok_mask[:, None] & (dims[None, :] < half)
    # both halves read: the table repeats them, but nothing here relies on it
    cos_lo = tl.load(cache_ptr + c_off, mask=c_mask, other=0.0)
    cos_hi = tl.load(cache_ptr + c_off + half, mask=c_mask, other=0.0)
    sin_lo = tl.load(cache_ptr + c_off + stride_cs, mask=c_mask, other=0.0)
    sin_hi = tl.load(cache_ptr + c_off + stride_cs + half, mask=c_mask, other=0.0)
    _rotate_heads(q_ptr, tok, tok_mask, stride_qt, stride_qh, num_q_heads, half, cos_lo, cos_hi, sin_lo, sin_hi,
                  BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, tok, tok_mask, stride_kt, stride_kh, num_k_heads, half, cos_lo, cos_hi, sin_lo, sin_hi,
                  BLOCK_HK, BLOCK_HALF)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    if cos_sin.dim() != 3 or cos_sin.shape[1] != 2 or cos_sin.dtype != torch.float32 or cos_sin.stride(-1) != 1:
        raise ValueError(f"cos_sin must be the float32 [max_positions, 2, head_dim] table with a contiguous last "
                         f"dimension; got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    head_dim = cos_sin.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd; rotary embedding needs an even head_dim")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3 or t.shape[2] != head_dim or t.shape[0] != positions.shape[0] or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{positions.shape[0]}, heads, {head_dim}] with a contiguous last "
                             f"dimension; got shape {tuple(t.shape)} strides {t.stride()}")
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q and k are {q.dtype}/{k.dtype}; both must be one of {SUPPORTED_DTYPES}")
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be a 1-D int32/int64 tensor; got {positions.dtype} {tuple(positions.shape)}")
    if not (q.device == k.device == positions.device == cos_sin.device):
        raise ValueError("q, k, positions and cos_sin must be on one device")


def rotary_embedding(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin: torch.Tensor,  # [max_positions, 2, head_dim] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place and returns them. Positions must be below max_positions; they are
    not checked on the device. q and k must not overlap (they may share a buffer, as qkv views)."""
    _check(q, k, positions, cos_sin)
    num_tokens, half = q.shape[0], cos_sin.shape[2] // 2
    if num_tokens == 0:
        return q, k
    block_hq, block_hk = triton.next_power_of_2(q.shape[1]), triton.next_power_of_2(k.shape[1])
    block_half = triton.next_power_of_2(half)
    block_t = min(max(1, _TILE_ELEMS // (block_hq * block_half)), triton.next_power_of_2(num_tokens))
    _rotary_kernel[(triton.cdiv(num_tokens, block_t),)](
        q,
        k,
        positions,
        cos_sin,
        num_tokens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.stride(0),
        cos_sin.stride(1),
        q.shape[1],
        k.shape[1],
        half,
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=4 if block_t * block_hq * block_half >= 1024 else 1,
    )
    return q, k


def rotary_embedding_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `rotary_embedding` computes, as new tensors: float32 math, one rounding to x's dtype."""
    _check(q, k, positions, cos_sin)
    rows = cos_sin[positions.long()]  # [num_tokens, 2, head_dim]
    cos, sin = rows[:, 0:1], rows[:, 1:2]
    half = cos_sin.shape[2] // 2

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)
