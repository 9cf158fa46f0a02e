"""Shared-prefix decode attention in batched PyTorch ops: the fast CPU path.

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` (which stays the
definition; tests compare the two). The reference loops over groups in Python (a gather, a matmul
and a scatter per group per layer); here a step's groups are padded into a few buckets and each
bucket is one batched computation, every group's prefix still read once:

  prefix part: bucket of B groups, queries padded to M members -> [B, kv_heads, M * heads_per_kv, d]
               against the prefix KV gathered a block at a time and padded to the bucket's longest
               prefix -> [B, kv_heads, L, d] (padding masked by an additive -inf bias); one call of
               PyTorch's fused CPU attention kernel per bucket (it returns the log-sum-exp too;
               elsewhere, or if a torch lacks it, the matmul form of `attention_with_lse_reference`).
  suffix part: every row over its own positions, padded to the longest suffix (as the reference).
  merge:       by log-sum-exp (`merge_attention_states`).

Buckets: groups sorted by prefix length, a group joins the current bucket while the bucket's padded
work (groups x longest prefix x most members) stays within twice its real work, so one long prefix
or one large group never makes every group pay for its padding.

All index tensors are built once per step on the host (`plan_shared_prefix_torch`); every layer
reuses them and the step's gather buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.paged_attention_torch import GatherBuffers
from kernels.shared_prefix_attention import (
    SharedPrefixBatch,
    attention_with_lse_reference,
    decode_output,
    merge_attention_states,
)

__all__ = ["PrefixBucket", "TorchSharedPrefixPlan", "plan_shared_prefix_torch", "shared_prefix_decode_torch"]

PAD_WORK_FACTOR = 2.0  # a bucket's padded work may be at most this many times its real work


@dataclass(frozen=True)
class PrefixBucket:
    """Groups computed as one batch: B groups, each padded to M members and L = width * block_size keys."""

    rows: torch.Tensor  # [n] int64: rows of the batch (group order) of the bucket's members
    slots: torch.Tensor  # [n] int64: each member's place in the padded [B * M] query rows
    blocks: torch.Tensor  # [B * width] int64: the groups' prefix blocks, each group padded to width
    invalid: torch.Tensor  # [k] int64: positions of the gathered [B * L] keys past their group's prefix
    bias: torch.Tensor  # [B, 1, 1, L] float32: 0 on each group's prefix positions, -inf after
    num_groups: int
    members: int  # M


@dataclass(frozen=True)
class TorchSharedPrefixPlan:
    batch: SharedPrefixBatch
    buckets: tuple[PrefixBucket, ...]
    # suffix part (None when every row's suffix is empty): W = the longest suffix
    suffix_slots: torch.Tensor | None  # [R, W] int64 cache slot of each row's suffix position
    suffix_invalid: torch.Tensor | None  # [k] int64: positions of the gathered [R * W] keys past each row's context
    suffix_bias: torch.Tensor | None  # [R, 1, 1, W] float32
    suffix_has_key: torch.Tensor | None  # [R] bool: the row's suffix is not empty
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)


def _bias(valid: np.ndarray) -> torch.Tensor:
    """[n, L] bool -> [n, 1, 1, L] float32 additive mask."""
    return torch.from_numpy(np.where(valid, 0.0, -np.inf).astype(np.float32)[:, None, None, :])


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
            invalid=torch.from_numpy(np.flatnonzero(~valid)).to(device),
            bias=_bias(valid).to(device),
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
    buckets = _buckets(batch, device)
    if not width:
        return TorchSharedPrefixPlan(batch, buckets, None, None, None, None)
    bs = batch.block_size
    offs = np.arange(width, dtype=np.int64)[None, :]
    valid = offs < lens[:, None]
    first = sstart // bs  # == table_starts: column 0 of a row's table is this block
    pos = np.where(valid, sstart[:, None] + offs, first[:, None] * bs)  # padding reads a slot, then is zeroed
    tables = batch.block_tables.to("cpu", torch.int64).numpy()
    slots = np.take_along_axis(tables, pos // bs - first[:, None], axis=1) * bs + pos % bs
    return TorchSharedPrefixPlan(
        batch, buckets, torch.from_numpy(slots).to(device), torch.from_numpy(np.flatnonzero(~valid)).to(device),
        _bias(valid).to(device), torch.from_numpy(lens > 0).to(device),
    )


def _attention_lse(
    q: torch.Tensor,  # [n, kv_heads, rows, d]: the query heads of each KV head folded into rows
    k: torch.Tensor,  # [n, kv_heads, L, d], zeros where bias is -inf
    v: torch.Tensor,
    bias: torch.Tensor,  # [n, 1, 1, L] float32
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [n, kv_heads, rows, d] float32, lse [n, kv_heads, rows] natural log); a row without a
    visible key gets out 0 and lse 0 (the caller marks it -inf)."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias.to(q.dtype), scale=scale)
        return out.float(), lse.float()
    out, lse = attention_with_lse_reference(q, k, v, scale, mask=torch.isfinite(bias))
    return out.float(), torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


# PyTorch's fused CPU attention kernel, the one SDPA runs on CPU, which also returns the log-sum-exp
# (SDPA's public form drops it). Private: without it the matmul reference form runs.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
    out = decode_output(q, k_cache, v_cache, batch, out)
    num_rows = batch.num_rows
    if num_rows == 0:
        return out
    ratio = num_heads // num_kv_heads
    qd = q[batch.query_index]  # [R, H, D]

    pre_out = torch.zeros((num_rows, num_heads, head_dim), dtype=torch.float32, device=q.device)
    pre_lse = torch.full((num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i, b in enumerate(plan.buckets):
        g, m = b.num_groups, b.members
        # [B * width, bs, KVH, D] -> [B * L, KVH, D]; slots past a prefix may hold anything (NaN): zeroed
        k = plan.buffers.gather(f"k{i}", k_cache, b.blocks).view(-1, num_kv_heads, head_dim).index_fill_(0, b.invalid, 0.0)
        v = plan.buffers.gather(f"v{i}", v_cache, b.blocks).view(-1, num_kv_heads, head_dim).index_fill_(0, b.invalid, 0.0)
        k = k.view(g, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, KVH, L, D]
        v = v.view(g, -1, num_kv_heads, head_dim).transpose(1, 2)
        qp = q.new_zeros((g * m, num_heads, head_dim))
        qp[b.slots] = qd[b.rows]
        # [B, M, KVH, ratio, D] -> [B, KVH, M * ratio, D]: member-major rows within each KV head
        qg = qp.view(g, m, num_kv_heads, ratio, head_dim).transpose(1, 2).reshape(g, num_kv_heads, m * ratio, head_dim)
        o, lse = _attention_lse(qg, k, v, b.bias, scale)
        o = o.view(g, num_kv_heads, m, ratio, head_dim).transpose(1, 2).reshape(g * m, num_heads, head_dim)
        lse = lse.view(g, num_kv_heads, m, ratio).transpose(1, 2).reshape(g * m, num_heads)
        pre_out[b.rows] = o[b.slots]
        pre_lse[b.rows] = lse[b.slots]

    if plan.suffix_slots is None:
        merged = pre_out
    else:
        assert plan.suffix_invalid is not None and plan.suffix_bias is not None and plan.suffix_has_key is not None
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        flat = plan.suffix_slots.view(-1)
        k = plan.buffers.gather("ks", k_flat, flat).index_fill_(0, plan.suffix_invalid, 0.0)
        v = plan.buffers.gather("vs", v_flat, flat).index_fill_(0, plan.suffix_invalid, 0.0)
        k = k.view(num_rows, -1, num_kv_heads, head_dim).transpose(1, 2)  # [R, KVH, W, D]
        v = v.view(num_rows, -1, num_kv_heads, head_dim).transpose(1, 2)
        qs = qd.view(num_rows, num_kv_heads, ratio, head_dim)  # the heads of a KV head as rows
        suf_out, suf_lse = _attention_lse(qs, k, v, plan.suffix_bias, scale)
        suf_lse = torch.where(plan.suffix_has_key[:, None, None], suf_lse, float("-inf"))
        merged, _ = merge_attention_states(pre_out, pre_lse, suf_out.reshape(num_rows, num_heads, head_dim),
                                           suf_lse.reshape(num_rows, num_heads))
    out[batch.query_index] = merged.to(out.dtype)
    return out
