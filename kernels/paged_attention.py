"""Attention over a paged KV cache: the PyTorch reference (and CPU path).

Layout shared with the Triton kernels:
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
  a slot is block_id * block_size + offset; slot -1 means "do not store".
Queries come as one flat batch without padding; sequence i owns queries
q[query_start[i]:query_start[i+1]], which are the last tokens of its context of context_lens[i] tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


@dataclass(frozen=True)
class PagedBatch:
    """The tensors that describe where each sequence's queries and context live.

    The attention function needs only tensors; the engine builds this once per step and every
    layer reuses it.
    decode_*: sequences with exactly one query, gathered as a padded batch.
    prefill_*: the others, one entry each (host ints, so slicing needs no device sync).
    """

    # decode part
    decode_query_index: torch.Tensor  # [num_decode] rows of q
    decode_slots: torch.Tensor  # [num_decode, max_context] int64 slot of each context position
    decode_mask: torch.Tensor  # [num_decode, 1, 1, max_context] bool, True where the key is valid
    # prefill part: (query_start, query_len, context_len) per prefill sequence
    prefill_spans: tuple[tuple[int, int, int], ...]
    prefill_slots: tuple[torch.Tensor, ...]  # per prefill sequence, [context_len] int64


def build_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> PagedBatch:
    """Host-side metadata for `paged_attention_reference` (built once per step)."""
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    spans: list[tuple[int, int, int]] = []
    prefill_slots: list[torch.Tensor] = []
    start = 0
    offsets = torch.arange(block_size, dtype=torch.int64)
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        assert 0 < q_len <= ctx_len <= len(table) * block_size
        if q_len == 1:
            decode_rows.append(start)
            decode_tables.append(table)
            decode_lens.append(ctx_len)
        else:
            blocks = torch.tensor(table, dtype=torch.int64)
            slots = (blocks[:, None] * block_size + offsets[None, :]).flatten()[:ctx_len]
            spans.append((start, q_len, ctx_len))
            prefill_slots.append(slots.to(device))
        start += q_len
    max_ctx = max(decode_lens, default=0)
    max_blocks = -(-max_ctx // block_size)
    padded = torch.zeros((len(decode_tables), max_blocks), dtype=torch.int64)
    for i, table in enumerate(decode_tables):
        n = -(-decode_lens[i] // block_size)
        padded[i, :n] = torch.tensor(table[:n], dtype=torch.int64)
    slots = (padded[:, :, None] * block_size + offsets[None, None, :]).flatten(1)[:, :max_ctx]
    lens = torch.tensor(decode_lens, dtype=torch.int64)
    mask = torch.arange(max_ctx)[None, :] < lens[:, None]
    # Padding points at the sequence's first (always written) slot: masked keys must still be finite,
    # since the cache is uninitialised and 0 * NaN would poison the output.
    slots = torch.where(mask, slots, slots[:, :1])
    return PagedBatch(
        decode_query_index=torch.tensor(decode_rows, dtype=torch.int64, device=device),
        decode_slots=slots.to(device),
        decode_mask=mask[:, None, None, :].to(device),
        prefill_spans=tuple(spans),
        prefill_slots=tuple(prefill_slots),
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [b, num_heads, q_len, d]; k, v: [b, num_kv_heads, kv_len, d]; mask broadcastable to [b, h, q, kv]
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads != num_kv_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def paged_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every query to its sequence's cached context (which includes itself).

    Returns [num_tokens, num_heads, head_dim].
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    if batch.decode_query_index.numel():
        # [num_decode, max_ctx, kv_heads, d] -> [num_decode, kv_heads, max_ctx, d]
        k = k_flat[batch.decode_slots].transpose(1, 2)
        v = v_flat[batch.decode_slots].transpose(1, 2)
        qd = q[batch.decode_query_index].unsqueeze(2)  # [num_decode, heads, 1, d]
        out[batch.decode_query_index] = _attend(qd, k, v, batch.decode_mask, scale).squeeze(2)
    for (start, q_len, ctx_len), slots in zip(batch.prefill_spans, batch.prefill_slots):
        k = k_flat[slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, d]
        v = v_flat[slots].transpose(0, 1).unsqueeze(0)
        qp = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
        # query j sits at position ctx_len - q_len + j and sees keys up to that position
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        out[start : start + q_len] = _attend(qp, k, v, mask, scale).squeeze(0).transpose(0, 1)
    return out
