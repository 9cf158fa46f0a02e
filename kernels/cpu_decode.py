"""Decode attention over the paged KV cache on CPU in compiled code (kernels/csrc/decode_attention.cpp).

Meaning: exactly `kernels.shared_prefix_attention.shared_prefix_decode_reference` for a step's decode
rows (with no groups, `kernels.paged_attention.paged_attention_reference` for decode rows); tests
compare them. Why compiled code: PyTorch's CPU attention pays a fixed cost per (row, KV head) and the
PyTorch paths gather every row's keys into a buffer first; this kernel reads the cache in place, keeps
a row's query heads together, and reads a group's prefix once for a tile of its members, through the
blocked loop the prefill kernel uses (kernels/csrc/attention_tiles.h); a row's own keys are scored 16
at a time, one vector of scores per query head; the next block of keys is requested a few cache lines
at a time while one is worked on, and so is a row's first block (or a KV head's first prefix block) while
the work before it is done. On a 2-core AMD EPYC it was 2.0-4.0x as fast per call as the PyTorch paths for
rows without groups and 2.2-3.5x for groups of 2 to 64 members, float32 (bench/cpu_decode_attention.py,
bench/results/cpu_decode_attention_cpu.json).

The kernel lives in the compiled library kernels/cpu_library.py builds; without it (no compiler,
BATCHLLM_NATIVE_KERNELS=0) callers keep their PyTorch paths: the same results, slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_library

__all__ = ["DecodeRows", "attention_call_shape", "native_decode", "native_decode_usable"]


@dataclass(frozen=True)
class DecodeRows:
    """A step's decode rows as the kernel reads them (kernels.shared_prefix_attention.SharedPrefixBatch's
    fields, contiguous CPU tensors), built once per step and reused by every layer. Positions of a row's
    keys are counted from its table's column 0 = block table_starts[r]; with no groups each row's whole
    context is its "suffix"."""

    query_index: torch.Tensor  # [R] int64: row of q and of out
    tables: torch.Tensor  # [R, max_blocks] int32
    table_starts: torch.Tensor  # [R] int32
    context_lens: torch.Tensor  # [R] int32: keys of the row, its query token included
    suffix_starts: torch.Tensor  # [R] int32: first key after the row's group prefix (0: no group)
    group_row_starts: torch.Tensor  # [G + 1] int32: group g's rows are [starts[g], starts[g + 1])
    prefix_tables: torch.Tensor  # [G, max_prefix_blocks] int32
    prefix_lens: torch.Tensor  # [G] int32

    @staticmethod
    def of(query_index: torch.Tensor, tables: torch.Tensor, table_starts: torch.Tensor, context_lens: torch.Tensor,
           suffix_starts: torch.Tensor, group_row_starts: torch.Tensor, prefix_tables: torch.Tensor,
           prefix_lens: torch.Tensor) -> DecodeRows:
        def i32(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", torch.int32).contiguous()

        def matrix(t: torch.Tensor, rows: int) -> torch.Tensor:  # [rows, columns], also for 0 rows
            return i32(t).reshape(rows, t.numel() // rows if rows else 0)

        return DecodeRows(query_index.to("cpu", torch.int64).contiguous(), matrix(tables, query_index.shape[0]),
                          i32(table_starts), i32(context_lens), i32(suffix_starts), i32(group_row_starts),
                          matrix(prefix_tables, prefix_lens.shape[0]), i32(prefix_lens))

    @staticmethod
    def without_groups(query_index: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor) -> DecodeRows:
        rows = query_index.shape[0]
        zeros = torch.zeros(rows, dtype=torch.int32)
        empty = torch.zeros(0, dtype=torch.int32)
        return DecodeRows.of(query_index, tables, zeros, context_lens, zeros, torch.zeros(1, dtype=torch.int32),
                             empty, empty)


def native_decode_usable(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `native_decode` can serve these tensors (else the caller's PyTorch path)."""
    head_dim = q.shape[-1]
    return (q.is_cpu and q.dtype in cpu_library.LIBRARY_DTYPES and q.dtype == k_cache.dtype == out.dtype
            and q.dim() == 3 and q.stride()[1:] == (head_dim, 1) and out.stride()[1:] == (head_dim, 1)
            and k_cache.is_contiguous()
            and not (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad))
            and cpu_library.native_library() is not None)


def attention_call_shape(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, softcap: float | None
) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) of a compiled attention call, its invariants checked (the
    launchers of decode and prefill attention)."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert v_cache.is_contiguous() and v_cache.dtype == k_cache.dtype
    assert k_cache.shape[-1] == head_dim and num_heads % num_kv_heads == 0
    assert (softcap is None or softcap > 0) and (window is None or window > 0)
    return num_heads, num_kv_heads, head_dim


def native_decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], heads and dims contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    rows: DecodeRows,
    scale: float,
    out: torch.Tensor,  # like q: rows rows.query_index are written, others untouched
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    library = cpu_library.native_library()
    assert library is not None and native_decode_usable(q, k_cache, out)
    num_heads, num_kv_heads, head_dim = attention_call_shape(q, k_cache, v_cache, window, softcap)
    groups = rows.prefix_lens.shape[0]
    cpu_library.entry_point(library, "decode_attention", q.dtype)(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), out.stride(0),
        rows.query_index.shape[0], rows.query_index.data_ptr(), rows.tables.data_ptr(), rows.tables.shape[1],
        rows.table_starts.data_ptr(), rows.context_lens.data_ptr(), rows.suffix_starts.data_ptr(), groups,
        rows.group_row_starts.data_ptr(), rows.prefix_tables.data_ptr(), rows.prefix_tables.shape[1],
        rows.prefix_lens.data_ptr(), num_heads, num_kv_heads, head_dim, k_cache.shape[1], scale, softcap or 0.0,
        window or 0)
    return out
