"""Shared-prefix decode attention in batched PyTorch ops: the fast CPU path.

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` (which stays the
definition; tests compare the two). The reference loops over groups in Python (a gather, a matmul
and a scatter per group per layer); here a step's groups are padded into a few buckets and each
bucket is one batched computation, every group's prefix still read once:

  prefix part: bucket of B groups, queries padded to M members -> [B, kv_heads, M * heads_per_kv, d]
               against the prefix KV gathered a block at a time and padded to the bucket's longest
               prefix -> [B, kv_heads, L, d] (padding masked out); one batched matmul per bucket.
  suffix part: every row over its own positions, padded to the longest suffix (as the reference).
  merge:       by log-sum-exp (`merge_attention_states`).

Buckets: groups sorted by prefix length, a group joins the current bucket while the bucket's padded
work (groups x longest prefix x most members) stays within twice its real work, so one long prefix
or one large group never makes every group pay for its padding.

All index tensors are built once per step on the host (`plan_shared_prefix_torch`); every layer
reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.shared_prefix_attention import SharedPrefixBatch, attention_with_lse_reference, merge_attention_states

__all__ = ["PrefixBucket", "TorchSharedPrefixPlan", "plan_shared_prefix_torch", "shared_prefix_decode_torch"]

PAD_WORK_FACTOR = 2.0  # a bucket's padded work may be at most this many times its real work


@dataclass(frozen=True)
class PrefixBucket:
    """Groups computed as one batch: B groups, each padded to M members and L = width * block_size keys."""

    rows: torch.Tensor  # [n] int64: rows of the batch (group order) of the bucket's members
    slots: torch.Tensor  # [n] int64: each member's place in the padded [B * M] query rows
    blocks: torch.Tensor  # [B * width] int64: the groups' prefix blocks, each group padded to width
    key_valid: torch.Tensor  # [B, 1, 1, L] bool: prefix positions of each group
    num_groups: int
    members: int  # M


@dataclass(frozen=True)
class TorchSharedPrefixPlan:
    batch: SharedPrefixBatch
    buckets: tuple[PrefixBucket, ...]
    suffix_slots: torch.Tensor | None  # [R, W] int64 cache slot of each row's suffix position; None: W == 0
    suffix_valid: torch.Tensor | None  # [R, W] bool


def _buckets(batch: SharedPrefixBatch, device: torch.device) -> tuple[PrefixBucket, ...]:
    starts = np.asarray(batch.host_group_row_starts, dtype=np.int64)
    plens = np.asarray(batch.host_prefix_lens, dtype=np.int64)
    sizes = np.diff(starts)
    bs = batch.block_size
    tables = batch.prefix_block_tables.to("cpu", torch.int64).numpy()
    order = np.argsort(-plens, kind="stable")
    groups: list[list[int]] = []
    real = padded_max_m = 0
    for g in order.tolist():
        if groups:
            n_groups, longest = len(groups[-1]), int(plens[groups[-1][0]])
            m = max(padded_max_m, int(sizes[g]))
            if (n_groups + 1) * longest * m <= PAD_WORK_FACTOR * (real + int(plens[g] * sizes[g])):
                groups[-1].append(g)
                real += int(plens[g] * sizes[g])
                padded_max_m = m
                continue
        groups.append([g])
        real, padded_max_m = int(plens[g] * sizes[g]), int(sizes[g])
    out = []
    for members in groups:
        m = int(sizes[members].max())
        width = -(-int(plens[members[0]]) // bs)
        rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in members])
        slots = np.concatenate([b * m + np.arange(sizes[g]) for b, g in enumerate(members)])
        blocks = tables[members, :width]  # the first (longest) group's width: within the table
        valid = np.arange(width * bs)[None, :] < plens[members][:, None]
        out.append(PrefixBucket(
            rows=torch.from_numpy(rows).to(device),
            slots=torch.from_numpy(slots).to(device),
            blocks=torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1)).to(device),
            key_valid=torch.from_numpy(valid[:, None, None, :]).to(device),
            num_groups=len(members),
            members=m,
        ))
    return tuple(out)


def plan_shared_prefix_torch(batch: SharedPrefixBatch) -> TorchSharedPrefixPlan:
    """Per-step index tensors for `shared_prefix_decode_torch` (host work, once per step)."""
    device = batch.query_index.device
    ctx = np.asarray(batch.host_context_lens, dtype=np.int64)
    sstart = np.asarray(batch.host_suffix_starts, dtype=np.int64)
    lens = ctx - sstart
    width = int(lens.max()) if len(lens) else 0
    slots = valid = None
    if width:
        bs = batch.block_size
        offs = np.arange(width, dtype=np.int64)[None, :]
        valid_np = offs < lens[:, None]
        first = sstart // bs  # == table_starts: column 0 of a row's table is this block
        pos = np.where(valid_np, sstart[:, None] + offs, first[:, None] * bs)  # padding reads a slot, then is zeroed
        tables = batch.block_tables.to("cpu", torch.int64).numpy()
        cols = pos // bs - first[:, None]
        slots_np = np.take_along_axis(tables, cols, axis=1) * bs + pos % bs
        slots, valid = torch.from_numpy(slots_np).to(device), torch.from_numpy(valid_np).to(device)
    return TorchSharedPrefixPlan(batch, _buckets(batch, device), slots, valid)


def shared_prefix_decode_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: TorchSharedPrefixPlan,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `shared_prefix_decode_reference`: writes rows plan.batch.query_index of `out` (zeros like q
    when None; other rows untouched) and returns it."""
    batch = plan.batch
    num_kv_heads, head_dim = k_cache.shape[-2:]
    num_heads = q.shape[1]
    assert q.dim() == 3 and q.shape[2] == head_dim and num_heads % num_kv_heads == 0
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == batch.block_size
    if out is None:
        out = torch.zeros_like(q)
    num_rows = batch.num_rows
    if num_rows == 0:
        return out
    ratio = num_heads // num_kv_heads
    qd = q[batch.query_index]  # [R, H, D]

    pre_out = torch.zeros((num_rows, num_heads, head_dim), dtype=torch.float32, device=q.device)
    pre_lse = torch.full((num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b in plan.buckets:
        g, m = b.num_groups, b.members
        # [B * width, bs, KVH, D] -> [B, L, KVH, D]; padding blocks may hold anything (NaN): zeroed
        shape = (g, -1, num_kv_heads, head_dim)
        invalid = ~b.key_valid[:, 0, 0, :, None, None]
        k = k_cache.index_select(0, b.blocks).view(shape).masked_fill_(invalid, 0.0).transpose(1, 2)
        v = v_cache.index_select(0, b.blocks).view(shape).masked_fill_(invalid, 0.0).transpose(1, 2)
        qp = q.new_zeros((g * m, num_heads, head_dim))
        qp[b.slots] = qd[b.rows]
        # [B, M, KVH, ratio, D] -> [B, KVH, M * ratio, D]: member-major rows within each KV head
        qg = qp.view(g, m, num_kv_heads, ratio, head_dim).transpose(1, 2).reshape(g, num_kv_heads, m * ratio, head_dim)
        o, lse = attention_with_lse_reference(qg, k, v, scale, mask=b.key_valid)
        o = o.float().view(g, num_kv_heads, m, ratio, head_dim).transpose(1, 2).reshape(g * m, num_heads, head_dim)
        lse = lse.view(g, num_kv_heads, m, ratio).transpose(1, 2).reshape(g * m, num_heads)
        pre_out[b.rows] = o[b.slots]
        pre_lse[b.rows] = lse[b.slots]

    if plan.suffix_slots is not None:
        assert plan.suffix_valid is not None
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        keep = plan.suffix_valid[:, :, None, None]
        k = torch.where(keep, k_flat[plan.suffix_slots], 0).transpose(1, 2)  # [R, KVH, W, D]
        v = torch.where(keep, v_flat[plan.suffix_slots], 0).transpose(1, 2)
        suf_out, suf_lse = attention_with_lse_reference(qd[:, :, None, :], k, v, scale,
                                                        mask=plan.suffix_valid[:, None, None, :])
        merged, _ = merge_attention_states(pre_out, pre_lse, suf_out[:, :, 0].float(), suf_lse[:, :, 0])
    else:
        merged = pre_out
    out[batch.query_index] = merged.to(out.dtype)
    return out
