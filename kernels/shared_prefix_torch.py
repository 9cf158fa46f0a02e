"""Shared-prefix decode attention in batched PyTorch ops: the fast CPU path.

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` (which stays the
definition; tests compare the two). The reference loops over groups in Python (a gather, a matmul
and a scatter per group per layer); here a step's groups are padded into a few buckets and each
bucket is one batched computation, every group's prefix still read once:

  prefix part: bucket of B groups, queries padded to M members -> [B, kv_heads, M * heads_per_kv, d]
               against the prefix KV gathered once per group and padded to the bucket's longest
               prefix -> [B, kv_heads, L, d] (padding re-reads a written key, masked by an additive
               -inf bias, so an unwritten slot's NaN never reaches the kernel); one call of
               PyTorch's fused CPU attention kernel per bucket (it returns the log-sum-exp too;
               elsewhere, or if a torch lacks it, the matmul form of `attention_with_lse_reference`).
  suffix part: every row over its own positions, in chunks of rows of similar suffix length (longest
               first, at most DECODE_CHUNK_BYTES of gathered keys and values each), each padded to
               its own longest suffix: one long row does not pad every other row to its length.
  merge:       by log-sum-exp (`merge_with_nonempty`: a row's suffix holds its query token).

Buckets: groups sorted by prefix length, a group joins the current bucket while the bucket's padded
work (groups x longest prefix x most members) stays within twice its real work, so one long prefix
or one large group never makes every group pay for its padding.

All index tensors are built once per step on the host (`plan_shared_prefix_torch`); every layer
reuses them and the step's gather buffers.

Sliding windows: the plan is built for the largest window of the layers it serves and gathers
nothing before it (a group's prefix from the first block its earliest member's window reaches, a
row's suffix from its window's start; a group no member's window reaches is left out). Each layer's
window masks every member by its own position; the masks of a window are built at the first layer
asking for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.cpu_decode import DecodeRows, native_decode, native_decode_usable
from kernels.paged_attention_torch import GatherBuffers, length_chunks
from kernels.shared_prefix_attention import (
    SharedPrefixBatch,
    attention_with_lse_reference,
    decode_output,
    merge_attention_states,
)

__all__ = [
    "PrefixBucket", "TorchSharedPrefixPlan", "additive_mask", "attention_lse", "merge_with_nonempty",
    "pad_work_buckets", "plan_prefix_buckets", "plan_shared_prefix_buckets", "plan_shared_prefix_torch", "prefix_part",
    "shared_prefix_decode_torch",
]

PAD_WORK_FACTOR = 2.0  # a bucket's padded work may be at most this many times its real work


class _WindowMasks:
    """Additive masks of one part's padded keys, per sliding window a layer asks for (built at the
    first layer asking, reused by the others). Host arrays: key_pos [n, L] position of each padded
    key, valid [n, L] bool (a real key of the part), query_pos [n, M] position of each row's query."""

    def __init__(self, key_pos: np.ndarray, valid: np.ndarray, query_pos: np.ndarray, window: int | None,
                 device: torch.device, rows_per_query: int = 1) -> None:
        self.key_pos, self.valid, self.query_pos = key_pos, valid, query_pos
        self.rows_per_query = rows_per_query  # a windowed bias repeats each query's row this many times
        self.window = window  # the largest window served: keys before it were not gathered
        self.device = device
        self._cache: dict[int | None, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(bias, has_key): bias [n, 1, 1, L] (no window) or [n, 1, M * rows_per_query, L] float32, 0 on
        seen keys and -inf elsewhere; has_key [n, M] bool (False: a query seeing no key), None when
        every query sees one."""
        found = self._cache.get(window)
        if found is None:
            assert self.window is None or (window is not None and window <= self.window), (self.window, window)
            if window is None:
                seen = self.valid[:, None, :]
            else:
                seen = self.valid[:, None, :] & (self.key_pos[:, None, :] > self.query_pos[:, :, None] - window)
            has_key = seen.any(-1)
            rows = self.rows_per_query if window is not None else 1
            found = self._cache[window] = (
                additive_mask(np.repeat(seen, rows, axis=1)).to(self.device),
                None if has_key.all() else torch.from_numpy(has_key).to(self.device),
            )
        return found


@dataclass(frozen=True)
class PrefixBucket:
    """Groups computed as one batch: B groups, each padded to M members and L = width * block_size
    keys (each group's prefix from the first block its members' windows reach)."""

    rows: torch.Tensor  # [n] int64: rows of the batch (group order) of the bucket's members
    slots: torch.Tensor  # [n] int64: each member's place in the padded [B * M] query rows
    query_rows: torch.Tensor  # [B * M] int64: the batch row of each padded query (padding: its group's first)
    # [B * L] int64: cache slot of each group's prefix keys, padded with the group's first key (a written
    # slot, so no NaN of an unwritten one reaches the kernel: the mask hides it)
    key_slots: torch.Tensor
    masks: _WindowMasks  # per window: bias [B, 1, 1 or M * heads_per_kv, L], has_key [B, M]
    num_groups: int
    members: int  # M
    # [R] int64: the padded query slot of every row of the batch, when this bucket alone covers them all
    slot_of_row: torch.Tensor | None = None


@dataclass(frozen=True)
class SuffixChunk:
    """Rows of the suffix part attended together: n rows padded to `width` keys."""

    rows: torch.Tensor | None  # [n] int64 rows of the batch; None: all rows, in order
    query_index: torch.Tensor  # [n] int64: their rows of q
    slots: torch.Tensor  # [n * width] int64 cache slot of each key (padding: the row's query token)
    masks: _WindowMasks  # per window: bias [n, 1, 1, width], has_key [n, 1]
    width: int


@dataclass(frozen=True)
class _SuffixKeys:
    """Host arrays of the suffix part, W = the longest suffix: each row's key positions and slots
    (padding: its query token, written this step, so never an unwritten NaN), which are real, and
    its query position."""

    pos: np.ndarray  # [R, W]
    slots: np.ndarray  # [R, W]
    valid: np.ndarray  # [R, W]
    lens: np.ndarray  # [R]
    query_pos: np.ndarray  # [R, 1]


@dataclass(frozen=True)
class TorchSharedPrefixPlan:
    """A step's plan: the prefix part's buckets and the suffix part's keys are planned at the first
    layer that runs the PyTorch path (`parts`); the compiled CPU kernel needs neither (`native_rows`)."""

    batch: SharedPrefixBatch
    window: int | None = None
    heads_per_kv: int = 1
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)
    # "parts" -> (buckets, suffix); "native" -> DecodeRows; bytes of one key and value -> the suffix
    # part's chunks: each built at the first layer asking
    _chunks: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def buckets(self) -> tuple[PrefixBucket, ...]:
        return self._parts()[0]

    @property
    def suffix(self) -> _SuffixKeys | None:  # None when every row's suffix is empty
        return self._parts()[1]

    def _parts(self) -> tuple[tuple[PrefixBucket, ...], _SuffixKeys | None]:
        found = self._chunks.get("parts")
        if found is None:
            found = self._chunks["parts"] = _plan_parts(self.batch, self.window, self.heads_per_kv)
        return found

    def native_rows(self) -> DecodeRows:
        """The batch as the compiled CPU kernel reads it (built at the first layer)."""
        found = self._chunks.get("native")
        if found is None:
            b = self.batch
            found = self._chunks["native"] = DecodeRows.of(
                b.query_index, b.block_tables, b.table_starts, b.context_lens, b.suffix_starts, b.group_row_starts,
                b.prefix_block_tables, b.prefix_lens)
        return found

    def suffix_chunks(self, key_bytes: int) -> tuple[SuffixChunk, ...]:
        """The suffix part's rows in chunks of at most DECODE_CHUNK_BYTES of gathered keys and
        values (at least one row), longest suffixes first, each padded to its longest."""
        found = self._chunks.get(key_bytes)
        if found is None:
            found = self._chunks[key_bytes] = self._make_chunks(key_bytes)
        return found

    def _make_chunks(self, key_bytes: int) -> tuple[SuffixChunk, ...]:
        keys, device = self.suffix, self.batch.query_index.device
        assert keys is not None
        query_index = np.asarray(self.batch.host_query_index, dtype=np.int64)
        chunks = length_chunks(keys.lens, keys.lens, key_bytes)
        return tuple(
            SuffixChunk(
                rows=None if len(chunks) == 1 else torch.from_numpy(rows.copy()).to(device),
                query_index=torch.from_numpy(query_index[rows]).to(device),
                slots=torch.from_numpy(np.ascontiguousarray(keys.slots[rows, :width]).reshape(-1)).to(device),
                masks=_WindowMasks(keys.pos[rows, :width], keys.valid[rows, :width], keys.query_pos[rows],
                                   self.window, device),
                width=width,
            )
            for rows, width in chunks
        )


def additive_mask(valid: np.ndarray) -> torch.Tensor:
    """[n, rows, L] bool -> [n, 1, rows, L] float32 additive mask."""
    valid = valid.reshape(valid.shape[0], 1, -1, valid.shape[-1])
    return torch.from_numpy(np.where(valid, 0.0, -np.inf).astype(np.float32))


def plan_shared_prefix_buckets(
    batch: SharedPrefixBatch, window: int | None, ratio: int, device: torch.device
) -> tuple[PrefixBucket, ...]:
    """The prefix part's buckets of a batch's groups (see the module docstring)."""
    return plan_prefix_buckets(
        np.asarray(batch.host_group_row_starts, dtype=np.int64), np.asarray(batch.host_prefix_lens, dtype=np.int64),
        np.asarray(batch.host_context_lens, dtype=np.int64) - 1,
        batch.prefix_block_tables.to("cpu", torch.int64).numpy(), batch.block_size, batch.num_rows, window, ratio,
        device)


def pad_work_buckets(lengths: np.ndarray, rows: np.ndarray) -> list[list[int]]:
    """Items (indices) in buckets, longest first: an item joins the current bucket while the bucket's
    padded work (items x its first item's length x most rows) stays within PAD_WORK_FACTOR times its
    real work (lengths x rows, summed). Items of length <= 0 are left out."""
    buckets: list[list[int]] = []
    real = most_rows = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        if lengths[i] <= 0:
            continue
        work = int(lengths[i] * rows[i])
        if buckets:
            m = max(most_rows, int(rows[i]))
            if (len(buckets[-1]) + 1) * int(lengths[buckets[-1][0]]) * m <= PAD_WORK_FACTOR * (real + work):
                buckets[-1].append(i)
                real += work
                most_rows = m
                continue
        buckets.append([i])
        real, most_rows = work, int(rows[i])
    return buckets


def plan_prefix_buckets(
    starts: np.ndarray,  # [G + 1] int64: group g owns rows starts[g]:starts[g + 1]
    plens: np.ndarray,  # [G] int64: tokens of each group's prefix
    query_pos: np.ndarray,  # [R] int64: position of each row's query
    tables: np.ndarray,  # [G, >= ceil(max prefix / bs)] int64: each group's prefix blocks
    bs: int,
    num_rows: int,  # R (rows past starts[-1] have no group)
    window: int | None,
    ratio: int,
    device: torch.device,
) -> tuple[PrefixBucket, ...]:
    sizes = np.diff(starts)
    # the first block of each group's prefix that some member's window reaches (0 without a window)
    first_block = np.zeros(len(plens), dtype=np.int64)
    if window is not None and len(plens):
        first_block = np.maximum(np.minimum.reduceat(query_pos[: starts[-1]], starts[:-1]) - window + 1, 0) // bs
    spans = plens - first_block * bs  # keys from the first block on; <= 0: no member sees the prefix
    groups = pad_work_buckets(spans, sizes)  # a prefix wholly before every member's window: left out
    out = []
    for members in groups:
        m = int(sizes[members].max())
        width = -(-int(spans[members[0]]) // bs)
        rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in members])
        slots = np.concatenate([b * m + np.arange(sizes[g]) for b, g in enumerate(members)])
        query_rows = np.repeat(starts[members], m)
        query_rows[slots] = rows
        key_pos = first_block[members][:, None] * bs + np.arange(width * bs)[None, :]
        valid = key_pos < plens[members][:, None]
        read = np.where(valid, key_pos, first_block[members][:, None] * bs)  # padding: the first key
        key_slots = np.take_along_axis(tables[members], read // bs, axis=1) * bs + read % bs
        member_pos = np.zeros((len(members), m), dtype=np.int64)
        for b, g in enumerate(members):  # padding members take the group's first member's position
            member_pos[b] = query_pos[starts[g]]
            member_pos[b, : sizes[g]] = query_pos[starts[g] : starts[g + 1]]
        out.append(PrefixBucket(
            rows=torch.from_numpy(rows).to(device),
            slots=torch.from_numpy(slots).to(device),
            query_rows=torch.from_numpy(query_rows).to(device),
            key_slots=torch.from_numpy(key_slots.reshape(-1)).to(device),
            masks=_WindowMasks(key_pos, valid, member_pos, window, device, rows_per_query=ratio),
            num_groups=len(members),
            members=m,
            slot_of_row=(torch.from_numpy(slots[np.argsort(rows)]).to(device)
                         if len(groups) == 1 and len(rows) == num_rows else None),
        ))
    return tuple(out)


def plan_shared_prefix_torch(
    batch: SharedPrefixBatch, window: int | None = None, heads_per_kv: int = 1, buffers: GatherBuffers | None = None
) -> TorchSharedPrefixPlan:
    """Per-step plan for `shared_prefix_decode_torch` (host work, once per step, at the first layer).
    `window`: the largest sliding window of the layers it serves (None: some layer attends to
    everything); keys before it are not gathered. heads_per_kv: query heads per KV head (needed with a
    window). buffers: gather buffers to reuse (see `plan_paged_torch`)."""
    return TorchSharedPrefixPlan(batch, window, heads_per_kv, buffers if buffers is not None else GatherBuffers())


def _plan_parts(batch: SharedPrefixBatch, window: int | None,
                heads_per_kv: int) -> tuple[tuple[PrefixBucket, ...], _SuffixKeys | None]:
    device = batch.query_index.device
    ctx = np.asarray(batch.host_context_lens, dtype=np.int64)
    sstart = np.asarray(batch.host_suffix_starts, dtype=np.int64)
    buckets = plan_shared_prefix_buckets(batch, window, heads_per_kv, device)
    kstart = sstart if window is None else np.maximum(sstart, ctx - window)  # first key each row reads
    lens = ctx - kstart
    width = int(lens.max()) if len(lens) else 0
    if not width:
        return buckets, None
    bs = batch.block_size
    offs = np.arange(width, dtype=np.int64)[None, :]
    valid = offs < lens[:, None]
    first = sstart // bs  # == table_starts: column 0 of a row's table is this block
    # padding reads the row's query token (written this step, so never an unwritten NaN), masked
    pos = np.where(valid, kstart[:, None] + offs, ctx[:, None] - 1)
    tables = batch.block_tables.to("cpu", torch.int64).numpy()
    slots = np.take_along_axis(tables, pos // bs - first[:, None], axis=1) * bs + pos % bs
    return buckets, _SuffixKeys(pos, slots, valid, lens, ctx[:, None] - 1)


def attention_lse(
    q: torch.Tensor,  # [n, kv_heads, rows, d]: the query heads of each KV head folded into rows
    k: torch.Tensor,  # [n, kv_heads, L, d], zeros where bias is -inf
    v: torch.Tensor,
    bias: torch.Tensor,  # [n, 1, 1, L] float32
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [n, kv_heads, rows, d] float32, lse [n, kv_heads, rows] natural log); a row without a
    visible key gets out 0 and lse 0 (the caller marks it -inf). The fused kernel cannot soft-cap:
    with a `softcap` the matmul form runs."""
    if q.device.type == "cpu" and _FLASH_CPU is not None and softcap is None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias.to(q.dtype), scale=scale)
        return out.float(), lse.float()
    out, lse = attention_with_lse_reference(q, k, v, scale, mask=torch.isfinite(bias), softcap=softcap)
    return out.float(), torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


# PyTorch's fused CPU attention kernel, the one SDPA runs on CPU, which also returns the log-sum-exp
# (SDPA's public form drops it). Private: without it the matmul reference form runs.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prefix_part(
    qd: torch.Tensor,  # [R, H, D]: the query of each row of the batch the buckets were planned for
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    buckets: tuple[PrefixBucket, ...],
    buffers: GatherBuffers,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row over its group's prefix, each prefix read once per bucket:
    (out [R, H, D] float32, lse [R, H]); rows of no bucket get out 0 and lse -inf (an empty part)."""
    num_rows, num_heads, head_dim = qd.shape
    num_kv_heads = k_cache.shape[-2]
    ratio = num_heads // num_kv_heads
    pre_out = torch.zeros((num_rows, num_heads, head_dim), dtype=torch.float32, device=qd.device)
    pre_lse = torch.full((num_rows, num_heads), float("-inf"), dtype=torch.float32, device=qd.device)
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    for i, b in enumerate(buckets):
        g, m = b.num_groups, b.members
        k = buffers.gather(f"k{i}", k_flat, b.key_slots).view(g, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = buffers.gather(f"v{i}", v_flat, b.key_slots).view(g, -1, num_kv_heads, head_dim).transpose(1, 2)
        qp = qd.index_select(0, b.query_rows)  # [B * M, H, D]
        # [B, M, KVH, ratio, D] -> [B, KVH, M * ratio, D]: member-major rows within each KV head
        qg = qp.view(g, m, num_kv_heads, ratio, head_dim).transpose(1, 2).reshape(g, num_kv_heads, m * ratio, head_dim)
        bias, has_key = b.masks.get(window)  # [B, 1, 1 or M * ratio, L]: member-major as qg's rows
        assert bias.shape[2] in (1, m * ratio), "the plan was built for another number of heads per KV head"
        o, lse = attention_lse(qg, k, v, bias, scale, softcap)
        o = o.view(g, num_kv_heads, m, ratio, head_dim).transpose(1, 2).reshape(g * m, num_heads, head_dim)
        lse = lse.view(g, num_kv_heads, m, ratio).transpose(1, 2).reshape(g * m, num_heads)
        if has_key is not None:  # a member whose window reaches no prefix key: an empty part (out 0, not NaN)
            lse = torch.where(has_key.reshape(g * m, 1), lse, float("-inf"))
            o = torch.where(has_key.reshape(g * m, 1, 1), o, 0.0)
        if b.slot_of_row is not None:  # the only bucket, covering every row: no scatter
            return o.index_select(0, b.slot_of_row), lse.index_select(0, b.slot_of_row)
        pre_out[b.rows] = o[b.slots]
        pre_lse[b.rows] = lse[b.slots]
    return pre_out, pre_lse


def merge_with_nonempty(
    out_a: torch.Tensor,  # [..., head_dim] float32
    lse_a: torch.Tensor,  # [...] natural log, -inf for an empty part
    out_b: torch.Tensor,
    lse_b: torch.Tensor,  # [...] finite: part b always has a visible key
) -> torch.Tensor:
    """`merge_attention_states`' output when part b is never empty, in four ops instead of a dozen:
    out_b + (out_a - out_b) * sigmoid(lse_a - lse_b) (the weight of part a: exp(lse_a) / (exp(lse_a) +
    exp(lse_b)); 0 when part a is empty)."""
    weight = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    return torch.addcmul(out_b, out_a - out_b, weight)


def shared_prefix_decode_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: TorchSharedPrefixPlan,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
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
    if native_decode_usable(q, k_cache, out):
        native_decode(q, k_cache, v_cache, plan.native_rows(), scale, out, window, softcap)
        return out
    ratio = num_heads // num_kv_heads
    qd = q[batch.query_index].contiguous()  # [R, H, D]; contiguous: the fused CPU kernel misreads other layouts
    pre_out, pre_lse = prefix_part(qd, k_cache, v_cache, plan.buckets, plan.buffers, scale, window, softcap)

    if plan.suffix is None:
        out[batch.query_index] = pre_out.to(out.dtype)
        return out
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    for chunk in plan.suffix_chunks(2 * k_flat[0].numel() * k_flat.element_size()):
        rows = chunk.rows
        n = num_rows if rows is None else rows.shape[0]
        k = plan.buffers.gather("ks", k_flat, chunk.slots).view(n, chunk.width, num_kv_heads, head_dim).transpose(1, 2)
        v = plan.buffers.gather("vs", v_flat, chunk.slots).view(n, chunk.width, num_kv_heads, head_dim).transpose(1, 2)
        q_rows = qd if rows is None else qd[rows]
        qs = q_rows.view(n, num_kv_heads, ratio, head_dim)  # the heads of a KV head as rows
        pre_o, pre_l = (pre_out, pre_lse) if rows is None else (pre_out[rows], pre_lse[rows])
        bias, has_key = chunk.masks.get(window)
        suf_out, suf_lse = attention_lse(qs, k, v, bias, scale, softcap)
        suf_out = suf_out.reshape(n, num_heads, head_dim)
        if has_key is None:  # every row sees its own query token (the engine's case): the short merge
            merged = merge_with_nonempty(pre_o, pre_l, suf_out, suf_lse.reshape(n, num_heads))
        else:  # a row whose context ends with the prefix: an empty suffix part (the kernel's output there may be NaN)
            suf_out = torch.where(has_key[:, :, None], suf_out, 0.0)
            suf_lse = torch.where(has_key[:, :, None], suf_lse, float("-inf"))
            merged, _ = merge_attention_states(pre_o, pre_l, suf_out, suf_lse.reshape(n, num_heads))
        out[chunk.query_index] = merged.to(out.dtype)
    return out
