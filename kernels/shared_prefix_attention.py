"""Shared-prefix decode attention (BatchLLM), the PyTorch reference and CPU path.

Decode queries (one query token per row) are grouped. The members of a group have the same first
`prefix_len` context tokens (the group's shared prefix, whose KV lives in blocks they share; a
partial last prefix block may be a per-member copy with identical contents). Attention of a row is
split in two parts over disjoint key ranges:

  prefix part: the queries of ALL members of the group, with the query heads of each KV head folded
               into rows, attend to ONE copy of the prefix KV: one [members*heads_per_kv, prefix_len]
               score matrix per KV head (a matrix product, not a batch of vector products);
  suffix part: each query attends to its own context positions [prefix_len, context_len), read
               through its own block table (possibly empty).

Each part returns its output and log-sum-exp, and `merge_attention_states` combines them. The
result equals plain attention of the query over its whole context (`paged_attention_reference`).

Sliding windows (`window`, as in `kernels.paged_attention`): both parts mask by the row's own
position, so a member sees only the prefix keys its window reaches (possibly none: that part is then
empty and the merge takes the other).

Log-sum-exp convention in this module: NATURAL log of the sum of exp(scale * q.k) over the part's
keys, float32, -inf for a part without keys (whose output is 0). (The Triton kernels keep base-2
values internally; they never leak out.)

Cache layout as in `kernels.paged_attention`: [num_blocks, block_size, num_kv_heads, head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Hashable, Sequence

import numpy as np
import torch

from kernels.host_tensors import to_device
from kernels.paged_attention import soft_cap, visible_keys

__all__ = [
    "SharedPrefixBatch",
    "attention_with_lse_reference",
    "build_shared_prefix_batch",
    "merge_attention_states",
    "shared_prefix_decode_reference",
]


def attention_with_lse_reference(
    q: torch.Tensor,  # [batch, num_heads, q_len, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    scale: float,
    mask: torch.Tensor | None = None,
    causal_offset: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each (batch, head, query) row.

    `mask`: bool, broadcastable to [batch, num_heads, q_len, kv_len], True where the key is visible.
    `causal_offset`: if given, query i sits at position causal_offset + i and sees keys 0..that
    position (combined with `mask` when both are given).
    GQA: num_heads must be a multiple of num_kv_heads; the heads_per_kv query heads of a KV head are
    folded into the rows of one matrix product (no K/V copy).
    Computed in float32. Returns (out [batch, num_heads, q_len, head_dim] in q's dtype,
    lse [batch, num_heads, q_len] float32, natural log). A row with no visible key gets out 0 and
    lse -inf. `softcap`: scaled scores are soft-capped (`soft_cap`) before the softmax and the lse.
    """
    assert q.dim() == 4 and k.dim() == 4 and v.shape == k.shape, (q.shape, k.shape, v.shape)
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    assert k.shape[0] == b and k.shape[3] == d and h % hk == 0, (q.shape, k.shape)
    r = h // hk
    visible = None
    if mask is not None:
        visible = mask.to(torch.bool).expand(b, h, m, n)
    if causal_offset is not None:
        q_pos = torch.arange(causal_offset, causal_offset + m, device=q.device)
        causal = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        visible = causal.expand(b, h, m, n) if visible is None else visible & causal
    qf = q.float().reshape(b, hk, r * m, d)  # rows: (head in KV group, query)
    scores = soft_cap(torch.matmul(qf, k.float().transpose(-1, -2)) * scale, softcap)  # [b, hk, r*m, n]
    if visible is not None:
        scores = scores.masked_fill(~visible.reshape(b, hk, r * m, n), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if n else scores.new_full((b, hk, r * m, 1), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.float()) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out.reshape(b, h, m, d).to(q.dtype), lse.reshape(b, h, m)


def merge_attention_states(
    out_a: torch.Tensor,  # [..., head_dim]
    lse_a: torch.Tensor,  # [...] natural log, -inf for an empty part
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets: returns (out in out_a's dtype, lse float32).

    out = (out_a * exp(lse_a) + out_b * exp(lse_b)) / (exp(lse_a) + exp(lse_b)), computed stably.
    Either part may be empty (lse -inf); both empty gives out 0 and lse -inf.
    """
    assert out_a.shape == out_b.shape and lse_a.shape == lse_b.shape == out_a.shape[:-1]
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.float() * (wa / safe)[..., None]) + (out_b.float() * (wb / safe)[..., None])
    return out.to(out_a.dtype), m + torch.log(total)


@dataclass(frozen=True)
class SharedPrefixBatch:
    """Where the decode queries of one step, and their groups' shared prefixes, live.

    Rows are the decode queries in group order: group g owns the consecutive rows
    group_row_starts[g] : group_row_starts[g+1]; rows after group_row_starts[-1] have no group.
    Built on the host once per step (`build_shared_prefix_batch`); every layer reuses it.
    Device tensors are int32 (int64 for query_index); host_* are the same numbers as Python ints so
    launchers and the reference can plan without a device sync.
    """

    query_index: torch.Tensor  # [R] int64: row of q (and of the output) of each decode query
    # [R, max_blocks] int32: row r's block table from block table_starts[r] on (0-padded): a grouped
    # row's table starts at its suffix's first block, so a step never ships its group's prefix blocks
    # once per member (the group's prefix table holds them once)
    block_tables: torch.Tensor
    table_starts: torch.Tensor  # [R] int32: the block index of column 0 of each row's table
    context_lens: torch.Tensor  # [R] int32: context tokens of each row (including the query token)
    suffix_starts: torch.Tensor  # [R] int32: first position after its group's prefix (0: no group)
    group_row_starts: torch.Tensor  # [G + 1] int32
    prefix_block_tables: torch.Tensor  # [G, max_prefix_blocks] int32: one copy of each group prefix
    prefix_lens: torch.Tensor  # [G] int32: tokens of each group's shared prefix (> 0)
    block_size: int
    host_query_index: tuple[int, ...]
    host_context_lens: tuple[int, ...]
    host_suffix_starts: tuple[int, ...]
    host_group_row_starts: tuple[int, ...]
    host_prefix_lens: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return len(self.host_context_lens)

    @property
    def num_groups(self) -> int:
        return len(self.host_prefix_lens)


def build_shared_prefix_batch(
    query_rows: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    group_ids: Sequence[Hashable | None],
    prefix_lens: Sequence[int],
    block_size: int,
    device: torch.device | str,
    min_group_size: int = 2,
) -> SharedPrefixBatch:
    """Host-side metadata for one step's decode queries (one entry per decode row).

    query_rows[i]: the row of q holding row i's query token (its last context position).
    context_lens[i]: tokens in row i's context, the query token included (>= 1).
    block_tables[i]: row i's block table (at least ceil(context_len / block_size) blocks).
    group_ids[i]: any hashable naming row i's group, or None for a row without a group.
    prefix_lens[i]: tokens of the group's shared prefix (0 <= prefix_len <= context_len; the same for
      all members; ignored for None). The first prefix_len // block_size blocks must be the same
      block ids in every member's table; the partial last prefix block, if any, may be per-member
      copies with identical contents for the prefix positions (copy on write).
    Groups with fewer than `min_group_size` members or a prefix of 0 tokens are treated as rows
    without a group (their whole context is "suffix"); the result is the same, just computed per row.
    """
    n = len(query_rows)
    if not (len(context_lens) == len(block_tables) == len(group_ids) == len(prefix_lens) == n):
        raise ValueError("query_rows, context_lens, block_tables, group_ids and prefix_lens differ in length")
    if block_size < 1:
        raise ValueError("block_size must be positive")
    members: dict[Hashable, list[int]] = {}
    for i, (ctx, table, gid) in enumerate(zip(context_lens, block_tables, group_ids)):
        if ctx < 1 or len(table) * block_size < ctx:
            raise ValueError(f"row {i}: context of {ctx} tokens does not fit its {len(table)} blocks")
        if gid is not None:
            if not 0 <= prefix_lens[i] <= ctx:
                raise ValueError(f"row {i}: prefix of {prefix_lens[i]} tokens outside its context of {ctx}")
            members.setdefault(gid, []).append(i)
    order: list[int] = []
    row_starts: list[int] = [0]
    group_prefix_lens: list[int] = []
    prefix_tables: list[list[int]] = []
    suffix_starts: list[int] = []  # in `order`
    table_starts: list[int] = []
    tables_sorted: list[Sequence[int]] = []
    for gid, rows in members.items():
        p = int(prefix_lens[rows[0]])
        if any(prefix_lens[i] != p for i in rows):
            raise ValueError(f"group {gid!r}: members disagree on the prefix length")
        if len(rows) < min_group_size or p == 0:
            continue
        full = p // block_size
        head = list(block_tables[rows[0]][: -(-p // block_size)])
        # the first and last full prefix blocks: a cheap check of the precondition (a full
        # comparison would cost a pass over every member's prefix blocks each step)
        ends = (head[0], head[full - 1]) if full else ()
        for i in rows[1:]:
            if full and (block_tables[i][0], block_tables[i][full - 1]) != ends:
                raise ValueError(f"group {gid!r}: members do not share the prefix's full blocks")
        order.extend(rows)
        row_starts.append(len(order))
        group_prefix_lens.append(p)
        prefix_tables.append(head)
        suffix_starts.extend([p] * len(rows))
        table_starts.extend([full] * len(rows))
        # a grouped row's table from its suffix's first block on; tables run to their end, not cut to
        # each context: positions past a context are never read
        tables_sorted.extend(block_tables[i][full:] for i in rows)
    if len(order) < n:
        grouped = set(order)
        rest = [i for i in range(n) if i not in grouped]
        order.extend(rest)
        suffix_starts.extend([0] * len(rest))
        table_starts.extend([0] * len(rest))
        tables_sorted.extend(block_tables[i] for i in rest)
    ctx_sorted = [int(context_lens[i]) for i in order]
    qrows = [int(query_rows[i]) for i in order]
    g = len(group_prefix_lens)
    # the int32 vectors in one host buffer: one copy to the device
    ints = to_device(ctx_sorted + suffix_starts + table_starts + row_starts + group_prefix_lens, torch.int32, device)
    ctx_d, suffix_d, starts_d, rows_d, plens_d = ints.split([n, n, n, g + 1, g])
    return SharedPrefixBatch(
        query_index=to_device(qrows, torch.int64, device),
        block_tables=_padded(tables_sorted, device),
        table_starts=starts_d,
        context_lens=ctx_d,
        suffix_starts=suffix_d,
        group_row_starts=rows_d,
        prefix_block_tables=_padded(prefix_tables, device),
        prefix_lens=plens_d,
        block_size=block_size,
        host_query_index=tuple(qrows),
        host_context_lens=tuple(ctx_sorted),
        host_suffix_starts=tuple(suffix_starts),
        host_group_row_starts=tuple(row_starts),
        host_prefix_lens=tuple(group_prefix_lens),
    )


def _padded(tables: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """[len(tables), max width] int32, each row a table followed by zeros (one numpy fill: a
    torch.tensor per row costs ~10 us each, milliseconds per step at hundreds of rows)."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(lengths.max()) if len(tables) else 0
    out = np.zeros((len(tables), max(width, 1)), dtype=np.int32)
    out[np.arange(max(width, 1))[None, :] < lengths[:, None]] = np.fromiter(
        chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    return to_device(torch.from_numpy(out), torch.int32, device)


def _slots(table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of context positions start..end-1 through one block table (int64)."""
    pos = torch.arange(start, end, device=table.device)
    return table.long()[pos // block_size] * block_size + pos % block_size


def decode_output(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: SharedPrefixBatch, out: torch.Tensor | None
) -> torch.Tensor:
    """The shape checks every shared-prefix decode path makes, and the tensor it writes its rows into
    (zeros like q when `out` is None)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    assert q.dim() == 3 and q.shape[2] == head_dim and q.shape[1] % num_kv_heads == 0
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == batch.block_size
    return torch.zeros_like(q) if out is None else out


def shared_prefix_decode_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    batch: SharedPrefixBatch,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of each decode query over its whole context (within its sliding `window` when
    given, scores soft-capped by `softcap` when given), computed as prefix part (per group, one matrix product against one copy of the prefix
    KV) + suffix part (per row), merged by LSE.

    Writes rows batch.query_index of `out` (allocated as zeros like q when None) and returns it;
    other rows of `out` are left untouched.
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    num_heads = q.shape[1]
    out = decode_output(q, k_cache, v_cache, batch, out)
    num_rows = batch.num_rows
    if num_rows == 0:
        return out
    bs = batch.block_size
    ratio = num_heads // num_kv_heads
    k_flat = k_cache.reshape(-1, num_kv_heads, head_dim)
    v_flat = v_cache.reshape(-1, num_kv_heads, head_dim)
    qd = q[batch.query_index]  # [R, H, D]
    query_pos = torch.tensor(batch.host_context_lens, device=q.device) - 1  # [R]

    # Prefix part: per group, rows (member, head in KV group) x prefix positions, one product per KV head.
    pre_out = torch.zeros((num_rows, num_heads, head_dim), dtype=torch.float32, device=q.device)
    pre_lse = torch.full((num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    starts = batch.host_group_row_starts
    for g, p in enumerate(batch.host_prefix_lens):
        r0, r1 = starts[g], starts[g + 1]
        slots = _slots(batch.prefix_block_tables[g], 0, p, bs)
        k = k_flat[slots].permute(1, 0, 2)[None]  # [1, KVH, P, D]
        v = v_flat[slots].permute(1, 0, 2)[None]
        # [n, KVH, ratio, D] -> [1, KVH, n * ratio, D]: member-major rows within each KV head
        qg = qd[r0:r1].reshape(r1 - r0, num_kv_heads, ratio, head_dim).permute(1, 0, 2, 3)
        qg = qg.reshape(1, num_kv_heads, (r1 - r0) * ratio, head_dim)
        visible = None
        if window is not None:  # [members, P] -> [1, 1, members * ratio, P], member-major as qg's rows
            keys = visible_keys(query_pos[r0:r1], torch.arange(p, device=q.device), window)
            visible = keys.repeat_interleave(ratio, dim=0)[None, None]
        o, lse = attention_with_lse_reference(qg, k, v, scale, mask=visible, softcap=softcap)
        pre_out[r0:r1] = o.float().reshape(num_kv_heads, r1 - r0, ratio, head_dim).permute(1, 0, 2, 3).reshape(
            r1 - r0, num_heads, head_dim
        )
        pre_lse[r0:r1] = lse.reshape(num_kv_heads, r1 - r0, ratio).permute(1, 0, 2).reshape(r1 - r0, num_heads)

    # Suffix part: each row over its own positions [suffix_start, context_len), padded and masked.
    lens = [c - s for c, s in zip(batch.host_context_lens, batch.host_suffix_starts)]
    width = max(lens)
    if width:
        pos = torch.tensor(batch.host_suffix_starts, device=q.device)[:, None] + torch.arange(width, device=q.device)
        valid = torch.arange(width, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
        first = batch.table_starts.long()[:, None]
        seen = valid & visible_keys(query_pos[:, None], pos, window)[:, 0]  # [R, W]
        pos = torch.where(valid, pos, first * bs)  # padding reads the table's first slot, then is zeroed
        tables = batch.block_tables.long()
        slots = torch.gather(tables, 1, pos // bs - first) * bs + pos % bs
        keep = valid[:, :, None, None]
        k = torch.where(keep, k_flat[slots], 0).transpose(1, 2)  # [R, KVH, W, D]; unwritten slots may hold NaN
        v = torch.where(keep, v_flat[slots], 0).transpose(1, 2)
        suf_out, suf_lse = attention_with_lse_reference(qd[:, :, None, :], k, v, scale, mask=seen[:, None, None, :],
                                                        softcap=softcap)
        suf_out, suf_lse = suf_out[:, :, 0], suf_lse[:, :, 0]
    else:
        suf_out = torch.zeros_like(pre_out)
        suf_lse = torch.full_like(pre_lse, float("-inf"))
    merged, _ = merge_attention_states(pre_out, pre_lse, suf_out.float(), suf_lse)
    out[batch.query_index] = merged.to(out.dtype)
    return out
