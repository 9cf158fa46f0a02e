"""Prefill attention over the paged KV cache on CPU in compiled code (kernels/csrc/prefill_attention.cpp).

Meaning: exactly `kernels.paged_attention.paged_attention_reference` for a step's prefill spans (chunks of
more than one query token: each token sees the keys up to its own position, within a sliding window);
tests compare them. Why compiled code: PyTorch's fused CPU attention runs float32 through MKL's
sgemm in small blocks (without AVX-512 on AMD CPUs), and the PyTorch path first gathers a chunk's
earlier keys out of the cache; this kernel reads the cache in place, reads each key once for all
query heads of its KV head, and holds 32 query rows in the lanes of two vectors, so a key element is
broadcast against them and the softmax needs no horizontal step (bench/cpu_prefill_attention.py,
bench/results/cpu_prefill_attention_cpu.json: per layer call against the PyTorch path, float32 and
bfloat16, prompts of 128-1,000 tokens at 64- and 128-wide heads). Plan mode's members' chunks after
their group's prefix run here too, as plain spans (kernels/group_prefill_torch.py).

It lives in the library kernels/cpu_library.py builds (one build, one cache entry, one switch:
BATCHLLM_NATIVE_KERNELS); without it, callers keep their PyTorch paths. float32 and bfloat16; the
blocked loop over keys (kernels/csrc/attention_tiles.h) also serves the decode kernel's groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kernels import cpu_decode, cpu_library

__all__ = ["PrefillSpans", "native_prefill", "native_prefill_usable"]


@dataclass(frozen=True)
class PrefillSpans:
    """A step's prefill spans as the kernel reads them (contiguous CPU tensors), built once per step."""

    info: torch.Tensor  # [S, 4] int64: first row of q, query tokens, context length, key start
    tables: torch.Tensor  # [S, max_blocks] int32: column 0 is the block holding position key start

    @staticmethod
    def of(spans: Sequence[tuple[int, int, int]], key_starts: Sequence[int], tables: Sequence[torch.Tensor]) -> PrefillSpans:
        """spans: (query start, query length, context length); key_starts: each span's first key (a
        block boundary); tables: each span's blocks from its key start on."""
        info = torch.tensor([[*span, key] for span, key in zip(spans, key_starts)], dtype=torch.int64).reshape(-1, 4)
        width = max((t.numel() for t in tables), default=0)
        padded = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, table in enumerate(tables):
            padded[i, : table.numel()] = table.to("cpu", torch.int32)
        return PrefillSpans(info.contiguous(), padded)


def native_prefill_usable(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `native_prefill` can serve these tensors (else the caller's PyTorch path)."""
    return cpu_decode.native_decode_usable(q, k_cache, out)


def native_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], heads and dims contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous, the step's keys stored
    v_cache: torch.Tensor,
    spans: PrefillSpans,
    scale: float,
    out: torch.Tensor,  # like q: the spans' rows are written, others untouched
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    library = cpu_library.native_library()
    assert library is not None and native_prefill_usable(q, k_cache, out)
    num_heads, num_kv_heads, head_dim = cpu_decode.attention_call_shape(q, k_cache, v_cache, window, softcap)
    cpu_library.entry_point(library, "prefill_attention", q.dtype)(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), out.stride(0),
        spans.info.shape[0], spans.info.data_ptr(), spans.tables.data_ptr(), spans.tables.shape[1], num_heads,
        num_kv_heads, head_dim, k_cache.shape[1], scale, softcap or 0.0, window or 0)
    return out
