"""Varlen attention over the paged KV cache in PyTorch ops: the fast CPU path.

Meaning: exactly `kernels.paged_attention.paged_attention_reference` (the definition; tests compare
the two). What it does differently, all decided once per step on the host (`plan_paged_torch`):
  - a prefill chunk that is its sequence's whole context (a first chunk: no cached tokens before
    it) attends to the step's new keys and values directly, without gathering them back from the
    cache (given `key` / `value`, as `StepContext` passes them);
  - the chunks' causal masks are built once per step, not once per layer;
  - decode rows zero only the gathered key/value slots past each row's context (the reference
    masks the whole gathered copy), and results go straight into `out`.
Sliding windows: blocks before the batch's window are never gathered (`build_paged_batch`); the masks
of each window a layer asks for are built once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.paged_attention import PagedBatch, attend, span_mask

__all__ = ["GatherBuffers", "TorchPagedPlan", "paged_attention_torch", "plan_paged_torch"]


class GatherBuffers:
    """A step's gather buffers, reused by every layer: a fresh large CPU tensor per layer pays its
    page faults again (a 29 MB gather took 2-3x as long into new memory as into a reused buffer)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """source.index_select(0, index), written into buffer `name` (a new tensor when autograd
        tracks source: out= arguments cannot be differentiated)."""
        if source.requires_grad and torch.is_grad_enabled():
            return source.index_select(0, index)
        shape = (index.shape[0], *source.shape[1:])
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != source.dtype or buf.device != source.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=source.dtype, device=source.device)
        return torch.index_select(source, 0, index, out=buf)


@dataclass(frozen=True)
class TorchPagedPlan:
    batch: PagedBatch
    decode_invalid: torch.Tensor  # [n] int64: positions of the flat gathered decode keys past each row's context
    buffers: GatherBuffers = field(default_factory=GatherBuffers, compare=False, repr=False)
    # window -> (decode mask [rows, 1, 1, keys] bool, per prefill span [q_len, keys] bool or None
    # when causal from 0): built at the first layer asking for the window, reused by the others
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


def plan_paged_torch(batch: PagedBatch) -> TorchPagedPlan:
    device = batch.decode_blocks.device
    invalid = np.flatnonzero(~batch.decode_mask.cpu().numpy().reshape(-1))
    return TorchPagedPlan(batch, torch.from_numpy(invalid).to(device))


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
    decode_mask, prefill_masks = plan.masks(window)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if batch.decode_query_index.numel():
        rows, width = batch.decode_blocks.shape
        flat = batch.decode_blocks.flatten()
        k = plan.buffers.gather("kd", k_cache, flat).view(-1, num_kv_heads, head_dim)
        v = plan.buffers.gather("vd", v_cache, flat).view(-1, num_kv_heads, head_dim)
        # unwritten slots may hold NaN, which a -inf bias or a 0 weight keeps: zero them
        k.index_fill_(0, plan.decode_invalid, 0.0)
        v.index_fill_(0, plan.decode_invalid, 0.0)
        k = k.view(rows, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = v.view(rows, -1, num_kv_heads, head_dim).transpose(1, 2)
        qd = q[batch.decode_query_index].unsqueeze(2)  # [rows, heads, 1, d]
        o = attend(qd, k, v, decode_mask, scale, softcap)
        out[batch.decode_query_index] = o.squeeze(2)
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
