"""Write the new tokens' K and V into the paged cache (Triton kernel, launcher, reference).

key, value: [num_tokens, num_kv_heads, head_dim]; token t goes to cache slot slot_mapping[t]
(= block * block_size + offset of k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]);
slot -1 means "do not store". The reference is `kernels.paged_attention.store_kv_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_attention import check_cache
from kernels.paged_attention import store_kv_reference

__all__ = ["store_kv", "store_kv_reference"]


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    block_size,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # (block & scalar masks come out as int32 in the interpreter: broadcast the slot test first)
    keep = (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim) & keep
    safe = tl.maximum(slot, 0)
    dst = (safe // block_size) * stride_cb + (safe % block_size) * stride_co
    dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = skip
) -> None:
    """Triton version of `store_kv_reference` (same arguments, same effect). Slots must be distinct
    (or -1) and below num_blocks * block_size; they are not checked on the device."""
    check_cache(k_cache, v_cache)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if key.dim() != 3 or key.shape[1:] != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value must be [num_tokens, {num_kv_heads}, {head_dim}]; "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise ValueError(f"key/value are {key.dtype}/{value.dtype} but the cache is {k_cache.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must have a contiguous last dimension")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 of shape [{key.shape[0]}]; "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if not (key.device == value.device == slot_mapping.device == k_cache.device):
        raise ValueError("key, value, slot_mapping and the cache must be on one device")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        num_kv_heads,
        head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
