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
  suffix part: each chunk's queries over its own keys after the prefix (causal), chunks of similar
               length padded into a bucket and computed as one batch [n, kv_heads, q_len * heads_per_kv, d]
               against [n, kv_heads, W, d] with an additive mask (a bucket's padded work stays within
               twice its real work, so one long chunk never makes many short ones pay for its padding);
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

from kernels.cpu_prefill import PrefillSpans, native_prefill, native_prefill_usable
from kernels.paged_attention_torch import GatherBuffers
from kernels.shared_prefix_torch import (
    PrefixBucket,
    additive_mask,
    attention_lse,
    merge_with_nonempty,
    pad_work_buckets,
    plan_prefix_buckets,
    prefix_part,
)

__all__ = ["SuffixBucket", "TorchGroupPrefillPlan", "group_prefill_torch", "plan_group_prefill_torch"]


@dataclass(frozen=True)
class SuffixBucket:
    """n chunks of the suffix part padded to Wq queries and Wk keys."""

    q_index: torch.Tensor  # [n * Wq] int64: row of q of each padded query slot (padding: the chunk's first)
    q_valid: torch.Tensor  # [t] int64: the real query slots of [n * Wq]
    slots: torch.Tensor  # [n * Wk] int64: cache slot of each chunk's suffix key (padding: its first, a written one)
    # host arrays of the masks: key_pos / key_ok [n, Wk], query_pos / query_ok [n, Wq]
    key_pos: np.ndarray
    key_ok: np.ndarray
    query_pos: np.ndarray
    query_ok: np.ndarray
    heads_per_kv: int
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def bias(self, window: int | None) -> torch.Tensor:
        """[n, 1, Wq * heads_per_kv, Wk] float32 additive mask for a layer's window (built at the
        first layer asking for it). Every query sees at least its own key; a padding query sees the
        chunk's first key (its row is dropped)."""
        found = self._masks.get(window)
        if found is None:
            q, k = self.query_pos[:, :, None], self.key_pos[:, None, :]
            seen = self.key_ok[:, None, :] & (k <= q)
            if window is not None:
                seen &= k > q - window
            seen[:, :, 0] |= ~self.query_ok
            bias = additive_mask(np.repeat(seen, self.heads_per_kv, axis=1))
            found = self._masks[window] = bias.to(self.q_index.device)
        return found


@dataclass(frozen=True)
class _BatchedParts:
    """The batched PyTorch path's metadata (built at the first layer that runs it)."""

    buckets: tuple[PrefixBucket, ...]
    token_rows: torch.Tensor
    suffix: tuple[SuffixBucket, ...]
    suffix_order: torch.Tensor | None


@dataclass(frozen=True)
class _Chunks:
    """The step's chunks in group order (host arrays), what both paths are planned from."""

    starts: np.ndarray  # [n] first row of q
    qls: np.ndarray  # [n] query tokens
    ctx: np.ndarray  # [n] context tokens
    plen: np.ndarray  # [n] the group's prefix tokens
    table: np.ndarray  # [n, width] int64 block tables
    firsts: np.ndarray  # [G] each group's first chunk
    block_size: int
    window: int | None
    device: torch.device


@dataclass(frozen=True)
class TorchGroupPrefillPlan:
    """One step's grouped prefill chunks: T query tokens, in group order (token_rows). The compiled CPU
    kernel reads `spans`; the batched PyTorch path's parts are built only when it runs."""

    heads_per_kv: int
    # the chunks as plain prefill spans (tables from position 0), for the compiled CPU kernel
    spans: PrefillSpans
    chunks: _Chunks = field(compare=False, repr=False)
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)
    _parts: dict = field(default_factory=dict, compare=False, repr=False)

    def parts(self) -> _BatchedParts:
        found = self._parts.get("parts")
        if found is None:
            found = self._parts["parts"] = _plan_batched_parts(self.chunks, self.heads_per_kv)
        return found

    @property
    def buckets(self) -> tuple[PrefixBucket, ...]:  # the prefix part: one row per query token
        return self.parts().buckets

    @property
    def token_rows(self) -> torch.Tensor:  # [T] int64: row of q of each query token (chunks in group order)
        return self.parts().token_rows

    @property
    def suffix(self) -> tuple[SuffixBucket, ...]:
        return self.parts().suffix

    @property
    def suffix_order(self) -> torch.Tensor | None:
        """[T] int64: where each token's suffix result sits among the buckets' concatenated real queries;
        None when that is token order already."""
        return self.parts().suffix_order


def _suffix_buckets(qls: np.ndarray, keys: np.ndarray) -> list[np.ndarray]:
    """Chunks (indices) grouped for the suffix part by `pad_work_buckets` (longest keys first, padded
    work chunks x most queries x most keys within PAD_WORK_FACTOR times the real work)."""
    out = pad_work_buckets(keys, qls)
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in out]  # in their order: one bucket needs no reordering


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
    buffers: GatherBuffers | None = None,
) -> TorchGroupPrefillPlan:
    """Per-step metadata of `group_prefill_torch`: one entry per chunk (its first row of q, query
    tokens, context tokens, block table, group and the group's prefix tokens, which must lie
    before the chunk's queries; members of a group share the prefix's full blocks).
    window: the largest sliding window of the layers it serves. buffers: gather buffers to reuse
    (see `plan_paged_torch`)."""
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
    firsts = np.cumsum([0] + [len(m) for m in by_group.values()])[:-1]  # each group's first chunk
    return TorchGroupPrefillPlan(
        heads_per_kv=heads_per_kv,
        spans=PrefillSpans(torch.from_numpy(np.stack([starts, qls, ctx, np.zeros_like(ctx)], axis=1)).contiguous(),
                           torch.from_numpy(table.astype(np.int32))),
        chunks=_Chunks(starts, qls, ctx, plen, table, firsts, bs, window, device),
        buffers=buffers if buffers is not None else GatherBuffers(),
    )


def _plan_batched_parts(c: _Chunks, heads_per_kv: int) -> _BatchedParts:
    starts, qls, ctx, plen, table, firsts, bs = c.starts, c.qls, c.ctx, c.plen, c.table, c.firsts, c.block_size
    # prefix part: every query token a row, groups in order
    j = np.arange(int(qls.max()))[None, :]
    query_ok = j < qls[:, None]
    query_pos = ctx[:, None] - qls[:, None] + j  # [n, Wq]
    chunk_tokens = np.concatenate([[0], np.cumsum(qls)])
    group_starts = np.append(chunk_tokens[firsts], chunk_tokens[-1])
    group_plens = plen[firsts]
    prefix_tables = table[firsts, : -(-int(group_plens.max()) // bs)]
    assert all((table[row, : p // bs] == prefix_tables[g, : p // bs]).all()
               for g, (row, p) in enumerate(zip(firsts, group_plens))), "members must share their prefix's blocks"
    buckets = plan_prefix_buckets(group_starts, group_plens, query_pos[query_ok], prefix_tables, bs,
                                  int(chunk_tokens[-1]), c.window, heads_per_kv, c.device)

    # suffix part: each chunk over its keys from its prefix's end, in buckets of similar lengths
    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(c.device)

    token_of = np.full(query_ok.shape, -1, dtype=np.int64)  # [n, Wq] token index (group order) of each query
    token_of[query_ok] = np.arange(int(chunk_tokens[-1]))
    q_rows = np.where(query_ok, starts[:, None] + j, starts[:, None])  # padding: the chunk's first row
    suffix: list[SuffixBucket] = []
    seen_tokens: list[np.ndarray] = []
    for chunks in _suffix_buckets(qls, ctx - plen):
        wq, wk = int(qls[chunks].max()), int((ctx - plen)[chunks].max())
        q_ok = query_ok[chunks, :wq]
        k = np.arange(wk)[None, :]
        k_ok = k < (ctx - plen)[chunks, None]
        k_pos = np.where(k_ok, plen[chunks, None] + k, plen[chunks, None])  # padding reads the first suffix key
        slots = np.take_along_axis(table[chunks], k_pos // bs, axis=1) * bs + k_pos % bs
        suffix.append(SuffixBucket(
            q_index=dev(q_rows[chunks, :wq].reshape(-1)), q_valid=dev(np.flatnonzero(q_ok)),
            slots=dev(slots.reshape(-1)), key_pos=k_pos, key_ok=k_ok, query_pos=query_pos[chunks, :wq],
            query_ok=q_ok, heads_per_kv=heads_per_kv,
        ))
        seen_tokens.append(token_of[chunks, :wq][q_ok])
    # the buckets' real queries, concatenated, are tokens `done` in that order: invert to token order
    done = np.concatenate(seen_tokens)
    order_of_token = np.empty_like(done)
    order_of_token[done] = np.arange(len(done))
    identity = bool((done == np.arange(len(done))).all())
    return _BatchedParts(buckets=buckets, token_rows=dev(q_rows[query_ok]), suffix=tuple(suffix),
                         suffix_order=None if identity else dev(order_of_token))


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
    if native_prefill_usable(q, k_cache, out):
        # the compiled kernel computes each chunk over its whole context (the prefix re-read per member,
        # from cache) faster than the batched ops below (bench/cpu_prefill_attention.py)
        return native_prefill(q, k_cache, v_cache, plan.spans, scale, out, window, softcap)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    num_heads = q.shape[1]
    ratio = num_heads // num_kv_heads
    assert ratio == plan.heads_per_kv, "the plan was built for another number of heads per KV head"
    # [T, H, D] float32 and [T, H], rows in token_rows' order
    pre_out, pre_lse = prefix_part(q[plan.token_rows], k_cache, v_cache, plan.buckets, plan.buffers, scale, window,
                                   softcap)

    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    outs, lses = [], []
    for i, b in enumerate(plan.suffix):
        n, wq = b.query_ok.shape
        k = plan.buffers.gather(f"ks{i}", k_flat, b.slots).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = plan.buffers.gather(f"vs{i}", v_flat, b.slots).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        # [n, Wq, KVH, ratio, D] -> [n, KVH, Wq * ratio, D]: token-major rows within each KV head
        qs = q[b.q_index].view(n, wq, num_kv_heads, ratio, head_dim).transpose(1, 2)
        o, lse = attention_lse(qs.reshape(n, num_kv_heads, wq * ratio, head_dim), k, v, b.bias(window), scale,
                               softcap)  # [n, KVH, Wq * ratio, D], [n, KVH, Wq * ratio]
        o = o.view(n, num_kv_heads, wq, ratio, head_dim).transpose(1, 2).reshape(n * wq, num_heads, head_dim)
        lse = lse.view(n, num_kv_heads, wq, ratio).transpose(1, 2).reshape(n * wq, num_heads)
        outs.append(o[b.q_valid])
        lses.append(lse[b.q_valid])
    suf_out = outs[0] if len(outs) == 1 else torch.cat(outs)
    suf_lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    if plan.suffix_order is not None:
        suf_out, suf_lse = suf_out[plan.suffix_order], suf_lse[plan.suffix_order]
    # every query sees its own key: the suffix part is never empty
    merged = merge_with_nonempty(pre_out, pre_lse, suf_out, suf_lse)
    out[plan.token_rows] = merged.to(out.dtype)
    return out
