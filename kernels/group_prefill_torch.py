"""Prefill of a group's members after their shared prefix, in batched PyTorch ops: the CPU path.

Meaning: exactly `kernels.paged_attention.paged_attention_reference` for the chunks it is given
(each chunk's queries over its cached context, causal; tests compare the two). The chunks are prefill
chunks of group members whose shared prefix lies wholly before their queries (a plan's rows right
after their document). Paged attention gathers the whole context per chunk, so a group of M members
reads its prefix M times per layer, in M small attention calls; here:

  prefix part: every query token of a group's chunks is a row of the shared-prefix launch
               (`kernels.shared_prefix_torch.prefix_part`): the prefix KV is gathered once per group,
               groups batched in buckets, one fused attention call per bucket
               ([B, kv_heads, tokens * heads_per_kv, d] against [B, kv_heads, L, d]);
  suffix part: each chunk's queries over its own keys after the prefix (causal), the chunks padded to
               the longest and computed as one batch [n, kv_heads, q_len * heads_per_kv, d] against
               [n, kv_heads, W, d] with an additive mask;
  merge:       by log-sum-exp (`merge_with_nonempty`: the suffix part always holds the query's own key).

Sliding windows: the prefix part follows the shared-prefix plan's rules (keys before the largest
window are not gathered, each layer's window masks by position); the suffix part masks keys outside
each layer's window. Soft-capping: both parts run their matmul forms (`attention_lse`).
All index tensors and masks are built on the host once per step (`plan_group_prefill_torch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
import torch

from kernels.paged_attention_torch import GatherBuffers
from kernels.shared_prefix_torch import (
    PrefixBucket,
    additive_mask,
    attention_lse,
    merge_with_nonempty,
    plan_prefix_buckets,
    prefix_part,
)

__all__ = ["TorchGroupPrefillPlan", "group_prefill_torch", "plan_group_prefill_torch"]


@dataclass(frozen=True)
class TorchGroupPrefillPlan:
    """One step's grouped prefill chunks, in group order: n chunks, T query tokens, padded to Wq
    queries and Wk suffix keys per chunk."""

    buckets: tuple[PrefixBucket, ...]  # the prefix part: one row per query token
    token_rows: torch.Tensor  # [T] int64: row of q of each query token (chunks in group order)
    q_index: torch.Tensor  # [n * Wq] int64: row of q of each padded query slot (padding: the chunk's first)
    q_valid: torch.Tensor  # [T] int64: the real query slots of [n * Wq], in token_rows' order
    slots: torch.Tensor  # [n * Wk] int64: cache slot of each chunk's suffix key (padding: its first, a written one)
    heads_per_kv: int
    # host arrays of the suffix masks: key_pos / key_ok [n, Wk], query_pos / query_ok [n, Wq]
    key_pos: np.ndarray
    key_ok: np.ndarray
    query_pos: np.ndarray
    query_ok: np.ndarray
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def suffix_bias(self, window: int | None) -> torch.Tensor:
        """[n, 1, Wq * heads_per_kv, Wk] float32 additive mask of the suffix part for a layer's
        window (built at the first layer asking for it). Every query sees at least its own key;
        a padding query sees the chunk's first key (its row is dropped)."""
        found = self._masks.get(window)
        if found is None:
            q, k = self.query_pos[:, :, None], self.key_pos[:, None, :]
            seen = self.key_ok[:, None, :] & (k <= q)
            if window is not None:
                seen &= k > q - window
            seen[:, :, 0] |= ~self.query_ok
            bias = additive_mask(np.repeat(seen, self.heads_per_kv, axis=1))
            found = self._masks[window] = bias.to(self.token_rows.device)
        return found


def plan_group_prefill_torch(
    query_starts: Sequence[int],
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    group_ids: Sequence[Hashable],
    prefix_lens: Sequence[int],
    block_size: int,
    device: torch.device | str,
    heads_per_kv: int,
    window: int | None = None,
) -> TorchGroupPrefillPlan:
    """Per-step metadata of `group_prefill_torch`: one entry per chunk (its first row of q, query
    tokens, context tokens, block table, group and the group's prefix tokens, which must lie
    before the chunk's queries; members of a group share the prefix's full blocks).
    window: the largest sliding window of the layers it serves."""
    device = torch.device(device)
    bs = block_size
    by_group: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        by_group.setdefault(gid, []).append(i)
    order = [i for members in by_group.values() for i in members]
    qls = np.asarray(query_lens, dtype=np.int64)[order]
    ctx = np.asarray(context_lens, dtype=np.int64)[order]
    plen = np.asarray(prefix_lens, dtype=np.int64)[order]
    starts = np.asarray(query_starts, dtype=np.int64)[order]
    assert len(order) and (plen > 0).all() and (plen <= ctx - qls).all(), "a prefix must lie before its chunk's queries"
    n = len(order)
    width = max(len(block_tables[i]) for i in order)
    table = np.zeros((n, width), dtype=np.int64)
    for row, i in enumerate(order):
        table[row, : len(block_tables[i])] = block_tables[i]

    # prefix part: every query token a row, groups in order
    j = np.arange(int(qls.max()))[None, :]
    query_ok = j < qls[:, None]
    query_pos = ctx[:, None] - qls[:, None] + j  # [n, Wq]
    firsts = np.cumsum([0] + [len(m) for m in by_group.values()])[:-1]  # each group's first chunk
    chunk_tokens = np.concatenate([[0], np.cumsum(qls)])
    group_starts = np.append(chunk_tokens[firsts], chunk_tokens[-1])
    group_plens = plen[firsts]
    prefix_tables = table[firsts, : -(-int(group_plens.max()) // bs)]
    assert all((table[row, : p // bs] == prefix_tables[g, : p // bs]).all()
               for g, (row, p) in enumerate(zip(firsts, group_plens))), "members must share their prefix's blocks"
    buckets = plan_prefix_buckets(group_starts, group_plens, query_pos[query_ok], prefix_tables, bs,
                                  int(chunk_tokens[-1]), window, heads_per_kv, device)

    # suffix part: each chunk over its keys from its prefix's end, padded
    q_index = np.where(query_ok, starts[:, None] + j, starts[:, None])
    k = np.arange(int((ctx - plen).max()))[None, :]
    key_ok = k < (ctx - plen)[:, None]
    key_pos = np.where(key_ok, plen[:, None] + k, plen[:, None])  # padding reads the first suffix key, masked
    slots = np.take_along_axis(table, key_pos // bs, axis=1) * bs + key_pos % bs

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    return TorchGroupPrefillPlan(
        buckets=buckets, token_rows=dev(q_index[query_ok]), q_index=dev(q_index.reshape(-1)),
        q_valid=dev(np.flatnonzero(query_ok)), slots=dev(slots.reshape(-1)), heads_per_kv=heads_per_kv,
        key_pos=key_pos, key_ok=key_ok, query_pos=query_pos, query_ok=query_ok,
    )


def group_prefill_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]: the chunks' keys already stored
    v_cache: torch.Tensor,
    plan: TorchGroupPrefillPlan,
    scale: float,
    out: torch.Tensor,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """As `paged_attention_reference` for the plan's chunks: writes their rows of `out` (others untouched)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    num_heads = q.shape[1]
    ratio = num_heads // num_kv_heads
    assert ratio == plan.heads_per_kv, "the plan was built for another number of heads per KV head"
    # [T, H, D] float32 and [T, H], rows in token_rows' order
    pre_out, pre_lse = prefix_part(q[plan.token_rows], k_cache, v_cache, plan.buckets, plan.buffers, scale, window,
                                   softcap)

    n, wq = plan.query_ok.shape
    k = plan.buffers.gather("ks", k_cache.view(-1, num_kv_heads, head_dim), plan.slots)
    v = plan.buffers.gather("vs", v_cache.view(-1, num_kv_heads, head_dim), plan.slots)
    k = k.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)  # [n, KVH, Wk, D]
    v = v.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
    # [n, Wq, KVH, ratio, D] -> [n, KVH, Wq * ratio, D]: token-major rows within each KV head
    qs = q[plan.q_index].view(n, wq, num_kv_heads, ratio, head_dim).transpose(1, 2)
    qs = qs.reshape(n, num_kv_heads, wq * ratio, head_dim)
    o, lse = attention_lse(qs, k, v, plan.suffix_bias(window), scale, softcap)
    o = o.view(n, num_kv_heads, wq, ratio, head_dim).transpose(1, 2).reshape(n * wq, num_heads, head_dim)
    lse = lse.view(n, num_kv_heads, wq, ratio).transpose(1, 2).reshape(n * wq, num_heads)
    # every query sees its own key: the suffix part is never empty
    merged = merge_with_nonempty(pre_out, pre_lse, o[plan.q_valid], lse[plan.q_valid])
    out[plan.token_rows] = merged.to(out.dtype)
    return out
