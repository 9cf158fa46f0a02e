"""Attention over a paged KV cache: the PyTorch reference (and CPU path).

Layout shared with the Triton kernels:
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
  a slot is block_id * block_size + offset; slot -1 means "do not store".
Queries come as one flat batch without padding; sequence i owns queries
q[query_start[i]:query_start[i+1]], which are the last tokens of its context of context_lens[i] tokens.

Sliding windows (transformers' rule): with a window of w, the query at position p sees the keys at
positions p - w < k <= p (itself and the w - 1 before it); window None is plain causal attention.
The window is an argument of each attention call (a per-layer setting); the batch is built for the
largest window any layer uses (`build_paged_batch(window=...)`) and does not gather blocks before it.
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


def first_visible_position(query_pos: int, window: int | None) -> int:
    """The first key position the query at `query_pos` sees."""
    return 0 if window is None else max(0, query_pos - window + 1)


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [..., q, k] from query positions [..., q] and key positions [..., k]: causal, and within
    the window when there is one. The one statement of the rule for the PyTorch paths."""
    q, k = query_pos[..., :, None], key_pos[..., None, :]
    visible = k <= q
    return visible if window is None else visible & (k > q - window)


def span_mask(
    ctx_len: int, q_len: int, key_start: int, window: int | None, device: torch.device | str
) -> torch.Tensor | None:
    """[q_len, ctx_len - key_start] bool mask of a chunk's queries (the last q_len positions of its
    context) over its keys from `key_start` on; None when it is plain causal attention from 0 (the
    chunk is the whole context and no query's window cuts off a key)."""
    if key_start == 0 and q_len == ctx_len and (window is None or window >= q_len):
        return None
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
    return visible_keys(q_pos, torch.arange(key_start, ctx_len, device=device), window)


@dataclass(frozen=True)
class PagedBatch:
    """The tensors that describe where each sequence's queries and context live.

    The attention function needs only tensors; the engine builds this once per step and every
    layer reuses it. Context is gathered a whole block at a time (much cheaper than per slot).
    decode_*: sequences with exactly one query, gathered as a padded batch.
    prefill_*: the others, one entry each (host ints, so slicing needs no device sync).
    Blocks wholly before the batch's `window` (of every query of the sequence) are not gathered:
    a sequence's gathered keys start at a block boundary, its key start.
    """

    # decode part
    decode_query_index: torch.Tensor  # [num_decode] rows of q
    decode_blocks: torch.Tensor  # [num_decode, max_blocks] int64, padded with the row's first block
    decode_mask: torch.Tensor  # [num_decode, 1, 1, max_blocks * block_size] bool, True on valid keys
    # prefill part: (query_start, query_len, context_len) per prefill sequence
    prefill_spans: tuple[tuple[int, int, int], ...]
    prefill_blocks: tuple[torch.Tensor, ...]  # per prefill sequence, its blocks from its key start on
    # where the gathered keys start (a multiple of block_size; 0 without a window)
    decode_key_starts: torch.Tensor | None = None  # [num_decode] int64; None: all 0
    prefill_key_starts: tuple[int, ...] = ()  # per prefill sequence; empty: all 0
    window: int | None = None  # the largest window the batch serves (None: any)

    def decode_visible(self, window: int | None) -> torch.Tensor:
        """[num_decode, 1, 1, max_blocks * block_size] bool: the valid keys each decode row sees."""
        if window is None:
            return self.decode_mask
        width = self.decode_mask.shape[-1]
        starts = self.decode_key_starts
        if starts is None:
            starts = torch.zeros(self.decode_mask.shape[0], dtype=torch.int64, device=self.decode_mask.device)
        key_pos = starts[:, None] + torch.arange(width, device=self.decode_mask.device)
        # the query sits at the row's last valid position
        query_pos = starts + self.decode_mask.reshape(len(key_pos), width).sum(-1) - 1
        return self.decode_mask & (key_pos > (query_pos - window)[:, None])[:, None, None, :]

    def prefill_key_start(self, i: int) -> int:
        return self.prefill_key_starts[i] if self.prefill_key_starts else 0

    def check_window(self, window: int | None) -> None:
        assert self.window is None or (window is not None and window <= self.window), (
            f"the batch was built for windows up to {self.window}, not {window}")


def build_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    window: int | None = None,
) -> PagedBatch:
    """Host-side metadata for `paged_attention_reference` (built once per step). `window`: the
    largest sliding window of the layers it serves (None: some layer attends to everything)."""
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    decode_first: list[int] = []
    spans: list[tuple[int, int, int]] = []
    prefill_blocks: list[torch.Tensor] = []
    prefill_first: list[int] = []
    start = 0
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        assert 0 < q_len <= ctx_len <= len(table) * block_size
        num_blocks = -(-ctx_len // block_size)
        first = first_visible_position(ctx_len - q_len, window) // block_size
        if q_len == 1:
            decode_rows.append(start)
            decode_tables.append(list(table[first:num_blocks]))
            decode_lens.append(ctx_len - first * block_size)
            decode_first.append(first * block_size)
        else:
            spans.append((start, q_len, ctx_len))
            prefill_blocks.append(torch.tensor(table[first:num_blocks], dtype=torch.int64, device=device))
            prefill_first.append(first * block_size)
        start += q_len
    max_blocks = max((len(t) for t in decode_tables), default=0)
    padded = torch.tensor([t + [t[0]] * (max_blocks - len(t)) for t in decode_tables], dtype=torch.int64)
    lens = torch.tensor(decode_lens, dtype=torch.int64)
    mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
    return PagedBatch(
        decode_query_index=torch.tensor(decode_rows, dtype=torch.int64, device=device),
        decode_blocks=padded.reshape(len(decode_tables), max_blocks).to(device),
        decode_mask=mask[:, None, None, :].to(device),
        prefill_spans=tuple(spans),
        prefill_blocks=tuple(prefill_blocks),
        decode_key_starts=None if window is None else torch.tensor(decode_first, dtype=torch.int64, device=device),
        prefill_key_starts=() if window is None else tuple(prefill_first),
        window=window,
    )


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping of scaled scores: softcap * tanh(scores / softcap)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention. q: [b, num_heads, q_len, d]; k, v: [b, num_kv_heads, kv_len, d]; mask: bool
    broadcastable to [b, h, q_len, kv_len], True where visible, or None: causal with q_len == kv_len.
    GQA without copying K/V per query head through PyTorch's fused attention; with a `softcap`
    (which it cannot apply) the matmul form, in float32."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        if gqa and mask is not None and all(n == 1 for n in mask.shape[-3:-1]):
            # every query of a row sees the same keys (decode): a KV head's query heads become rows of
            # one query, so the fused kernel reads each key once, not once per query head (SDPA's own
            # GQA took 1.3x as long on CPU for 192 decode rows x 512 keys: bench/decode_chunks.py)
            b, h, q_len, d = q.shape
            folded = q.reshape(b, k.shape[1], (h // k.shape[1]) * q_len, d)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
            # reshape, not view: on CUDA (float32 with a mask: the mem-efficient kernel) the output is a
            # transposed [b, rows, heads, d] buffer, which no view can merge back into heads
            return out.reshape(b, h, q_len, d)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    ratio = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(ratio, dim=1) if gqa else k.float()
    vf = v.float().repeat_interleave(ratio, dim=1) if gqa else v.float()
    scores = soft_cap(torch.matmul(q.float(), kf.transpose(-1, -2)) * scale, softcap)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(weights, vf).to(q.dtype)


def paged_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of every query to its sequence's cached context (which includes itself),
    within the sliding `window` when given (at most the batch's window), scores soft-capped by
    `softcap` when given.

    Returns [num_tokens, num_heads, head_dim].
    """
    batch.check_window(window)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    out = torch.empty_like(q)
    if batch.decode_query_index.numel():
        rows, width = batch.decode_blocks.shape
        flat = batch.decode_blocks.flatten()
        # [rows, width * block_size, kv_heads, d] -> [rows, kv_heads, ctx, d]
        # unwritten slots of a gathered block may hold anything (NaN in the tests); SDPA adds a
        # -inf bias to masked scores and weighs masked values by 0, and both turn NaN into NaN,
        # so masked keys and values are zeroed
        invalid = ~batch.decode_mask[:, 0, 0, :, None, None]
        k = k_cache.index_select(0, flat).view(rows, width * block_size, num_kv_heads, head_dim)
        v = v_cache.index_select(0, flat).view(rows, width * block_size, num_kv_heads, head_dim)
        k = k.masked_fill_(invalid, 0.0).transpose(1, 2)
        v = v.masked_fill_(invalid, 0.0).transpose(1, 2)
        qd = q[batch.decode_query_index].unsqueeze(2)  # [rows, heads, 1, d]
        out[batch.decode_query_index] = attend(qd, k, v, batch.decode_visible(window), scale, softcap).squeeze(2)
    for i, ((start, q_len, ctx_len), blocks) in enumerate(zip(batch.prefill_spans, batch.prefill_blocks)):
        key_start = batch.prefill_key_start(i)
        k = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[: ctx_len - key_start]
        v = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[: ctx_len - key_start]
        k = k.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx - key_start, d]
        v = v.transpose(0, 1).unsqueeze(0)
        qp = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
        # query j sits at position ctx_len - q_len + j and sees keys up to that position (in its window)
        mask = span_mask(ctx_len, q_len, key_start, window, q.device)
        out[start : start + q_len] = attend(qp, k, v, mask, scale, softcap).squeeze(0).transpose(0, 1)
    return out
