"""Varlen attention over the paged KV cache in PyTorch ops: the fast CPU path.

Meaning: exactly `kernels.paged_attention.paged_attention_reference` (the definition; tests compare
the two). What it does differently, all decided once per step on the host (`plan_paged_torch`):
  - a prefill chunk that is its sequence's whole context (a first chunk: no cached tokens before
    it) attends to the step's new keys and values directly, without gathering them back from the
    cache (given `key` / `value`, as `StepContext` passes them);
  - the chunks' causal masks are built once per step, not once per layer;
  - decode rows go to the compiled CPU kernel (kernels.cpu_decode: keys read in place) where it is
    built; otherwise (or on CUDA) in chunks of rows of similar context length (sorted longest first), each chunk
    gathered into a buffer of at most DECODE_CHUNK_BYTES and padded only to its own longest row: the
    gathered keys are still in cache when the attention reads them (one padded batch of every row
    read them back from memory: 1.5x slower at 192 rows x 528 keys), and one long row no longer pads
    every other row to its length;
  - decode rows zero only the gathered key/value slots past each row's context (the reference
    masks the whole gathered copy), and results go straight into `out`.
Sliding windows: blocks before the batch's window are never gathered (`build_paged_batch`); the masks
of each window a layer asks for are built once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.cpu_decode import DecodeRows, native_decode, native_decode_usable
from kernels.cpu_prefill import PrefillSpans, native_prefill, native_prefill_usable
from kernels.paged_attention import PagedBatch, attend, span_mask

__all__ = ["DECODE_CHUNK_BYTES", "DecodeChunk", "GatherBuffers", "TorchPagedPlan", "length_chunks",
           "paged_attention_torch", "plan_paged_torch"]

# Keys and values gathered per decode chunk: a few MB, so that the attention reads them from cache.
DECODE_CHUNK_BYTES = 16 << 20


class GatherBuffers:
    """Gather buffers reused by every layer and chunk of a step, and by the steps of an engine: a
    fresh large CPU tensor pays its page faults again (a 29 MB gather took 2-3x as long into new
    memory as into a reused buffer). A buffer grows to the largest gather asked of it; smaller ones
    use its start. One user at a time: a gather's result is used before the next gather by name."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """source.index_select(0, index), written into buffer `name` (a new tensor when autograd
        tracks source: out= arguments cannot be differentiated)."""
        if source.requires_grad and torch.is_grad_enabled():
            return source.index_select(0, index)
        shape = (index.shape[0], *source.shape[1:])
        numel = index.shape[0] * source[0].numel() if source.shape[0] else 0
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != source.dtype or buf.device != source.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=source.dtype, device=source.device)
        return torch.index_select(source, 0, index, out=buf[:numel].view(shape))


@dataclass(frozen=True)
class DecodeChunk:
    """Decode rows gathered and attended together: n rows padded to `width` blocks."""

    rows: torch.Tensor  # [n] int64: the rows' places among the batch's decode rows
    query_index: torch.Tensor  # [n] int64: their rows of q
    blocks: torch.Tensor  # [n * width] int64: their blocks, row-major
    invalid: torch.Tensor  # [k] int64: flat positions of the gathered keys past each row's context
    width: int


@dataclass(frozen=True)
class TorchPagedPlan:
    batch: PagedBatch
    decode_lens: np.ndarray  # [num_decode] int64: gathered keys each decode row uses (host)
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)
    # bytes of one gathered block's keys and values -> the decode chunks (built at the first layer)
    _chunks: dict = field(default_factory=dict, compare=False, repr=False)
    # window -> (decode mask [rows, 1, 1, keys] bool, per prefill span [q_len, keys] bool or None
    # when causal from 0), and ("chunks", window, ...) -> each decode chunk's mask: built at the first
    # layer asking for the window, reused by the others
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def masks(self, window: int | None) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        found = self._masks.get(window)
        if found is None:
            batch = self.batch
            batch.check_window(window)
            device = batch.decode_blocks.device
            prefill = tuple(
                span_mask(ctx_len, q_len, batch.prefill_key_start(i), window, device)
                for i, (_, q_len, ctx_len) in enumerate(batch.prefill_spans)
            )
            found = self._masks[window] = (batch.decode_visible(window), prefill)
        return found

    def decode_chunk_masks(self, window: int | None, chunks: tuple[DecodeChunk, ...], decode_mask: torch.Tensor,
                           block_size: int) -> tuple[torch.Tensor, ...]:
        """Each chunk's rows of `decode_mask` (this window's), cut to its width: selected at the
        first layer asking for the window, reused by the others."""
        key = ("chunks", window, id(chunks))  # chunks: the tuple decode_chunks keeps for this plan
        found = self._masks.get(key)
        if found is None:
            found = self._masks[key] = tuple(
                (decode_mask if len(chunks) == 1 else decode_mask[c.rows])[..., : c.width * block_size] for c in chunks)
        return found

    def native_rows(self) -> DecodeRows:
        """The decode rows as the compiled CPU kernel reads them (built at the first layer): each
        row's table from its key start on, and its keys counted from there."""
        found = self._chunks.get("native")
        if found is None:
            batch = self.batch
            found = self._chunks["native"] = DecodeRows.without_groups(
                batch.decode_query_index, batch.decode_blocks, torch.from_numpy(self.decode_lens))
        return found

    def native_spans(self) -> PrefillSpans:
        """The prefill spans as the compiled CPU kernel reads them (built at the first layer)."""
        found = self._chunks.get("native_spans")
        if found is None:
            batch = self.batch
            starts = [batch.prefill_key_start(i) for i in range(len(batch.prefill_spans))]
            found = self._chunks["native_spans"] = PrefillSpans.of(batch.prefill_spans, starts, batch.prefill_blocks)
        return found

    def decode_chunks(self, block_bytes: int) -> tuple[DecodeChunk, ...]:
        """The decode rows in chunks of at most DECODE_CHUNK_BYTES of gathered keys and values (at
        least one row), longest rows first, each chunk padded to its longest row's blocks."""
        found = self._chunks.get(block_bytes)
        if found is None:
            found = self._chunks[block_bytes] = _chunk_decode_rows(self.batch, self.decode_lens, block_bytes)
        return found


def length_chunks(lens: np.ndarray, widths: np.ndarray, unit_bytes: int) -> list[tuple[np.ndarray, int]]:
    """Rows in chunks of at most DECODE_CHUNK_BYTES of gathered keys and values (at least one row):
    (rows, width) each, width in the units of `widths` (each row's padded length; unit_bytes per unit).
    All rows in one chunk keep their order (the caller's masks need no selection); otherwise the rows
    go longest `lens` first, and a chunk is padded to its first (longest) row's width."""
    longest = max(1, int(widths.max(initial=0)))
    if len(lens) * longest * unit_bytes <= DECODE_CHUNK_BYTES:
        return [(np.arange(len(lens)), longest)]
    order = np.argsort(-lens, kind="stable")
    chunks: list[tuple[np.ndarray, int]] = []
    start = 0
    while start < len(order):
        width = max(1, int(widths[order[start]]))
        n = max(1, min(len(order) - start, DECODE_CHUNK_BYTES // (width * unit_bytes)))
        chunks.append((order[start : start + n], width))
        start += n
    return chunks


def _chunk_decode_rows(batch: PagedBatch, lens: np.ndarray, block_bytes: int) -> tuple[DecodeChunk, ...]:
    device = batch.decode_blocks.device
    block_size = batch.decode_mask.shape[-1] // max(1, batch.decode_blocks.shape[1])
    blocks = batch.decode_blocks.cpu().numpy()
    query_index = batch.decode_query_index.cpu().numpy()
    chunks = []
    for rows, width in length_chunks(lens, -(-lens // block_size), block_bytes):
        valid = np.arange(width * block_size)[None, :] < lens[rows][:, None]
        chunks.append(DecodeChunk(
            rows=torch.from_numpy(rows.copy()).to(device),
            query_index=torch.from_numpy(query_index[rows]).to(device),
            blocks=torch.from_numpy(np.ascontiguousarray(blocks[rows, :width]).reshape(-1)).to(device),
            invalid=torch.from_numpy(np.flatnonzero(~valid)).to(device),
            width=width,
        ))
    return tuple(chunks)


def plan_paged_torch(batch: PagedBatch, buffers: GatherBuffers | None = None) -> TorchPagedPlan:
    """buffers: gather buffers to reuse (an engine passes the same ones every step: new large
    buffers each step pay their page faults again); None: the plan's own."""
    mask = batch.decode_mask
    lens = mask.cpu().numpy().reshape(mask.shape[0], mask.shape[-1]).sum(-1).astype(np.int64)
    return TorchPagedPlan(batch, lens, buffers if buffers is not None else GatherBuffers())


def paged_attention_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: TorchPagedPlan,
    scale: float,
    out: torch.Tensor,
    key: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: the step's new keys, q's rows
    value: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """As `paged_attention_reference`, written into the covered rows of `out` (others untouched)."""
    batch = plan.batch
    batch.check_window(window)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if batch.decode_query_index.numel() and native_decode_usable(q, k_cache, out):
        # a window's first visible key, counted from the row's key start: its context minus the window
        native_decode(q, k_cache, v_cache, plan.native_rows(), scale, out, window, softcap)
    elif batch.decode_query_index.numel():
        decode_mask = plan.masks(window)[0]
        block_size = k_cache.shape[1]
        chunks = plan.decode_chunks(2 * k_cache[0].numel() * k_cache.element_size())
        for chunk, mask in zip(chunks, plan.decode_chunk_masks(window, chunks, decode_mask, block_size)):
            n, keys = chunk.rows.shape[0], chunk.width * block_size
            k = plan.buffers.gather("kd", k_cache, chunk.blocks).view(-1, num_kv_heads, head_dim)
            v = plan.buffers.gather("vd", v_cache, chunk.blocks).view(-1, num_kv_heads, head_dim)
            # unwritten slots may hold NaN, which a -inf bias or a 0 weight keeps: zero them
            k.index_fill_(0, chunk.invalid, 0.0)
            v.index_fill_(0, chunk.invalid, 0.0)
            k = k.view(n, keys, num_kv_heads, head_dim).transpose(1, 2)  # [n, kv_heads, keys, d]
            v = v.view(n, keys, num_kv_heads, head_dim).transpose(1, 2)
            qd = q[chunk.query_index].unsqueeze(2)  # [n, heads, 1, d]
            o = attend(qd, k, v, mask, scale, softcap)
            out[chunk.query_index] = o.squeeze(2)
    if batch.prefill_spans and native_prefill_usable(q, k_cache, out):
        return native_prefill(q, k_cache, v_cache, plan.native_spans(), scale, out, window, softcap)
    prefill_masks = plan.masks(window)[1] if batch.prefill_spans else ()
    for i, ((start, q_len, ctx_len), blocks, mask) in enumerate(
        zip(batch.prefill_spans, batch.prefill_blocks, prefill_masks)
    ):
        key_start = batch.prefill_key_start(i)
        if q_len == ctx_len and key is not None and value is not None:
            k, v = key[start : start + q_len], value[start : start + q_len]  # the whole context is this chunk
        else:
            k = plan.buffers.gather(f"k{i}", k_cache, blocks).view(-1, num_kv_heads, head_dim)[: ctx_len - key_start]
            v = plan.buffers.gather(f"v{i}", v_cache, blocks).view(-1, num_kv_heads, head_dim)[: ctx_len - key_start]
        k = k.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, d]
        v = v.transpose(0, 1).unsqueeze(0)
        qp = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
        o = attend(qp, k, v, mask, scale, softcap)
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
    return out
