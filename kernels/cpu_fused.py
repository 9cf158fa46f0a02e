"""A decoder layer's elementwise steps on CPU in compiled code (kernels/csrc/fused_ops.cpp), one pass each.

Meaning: exactly the PyTorch ops they replace (tests compare them): RMSNorm with the residual add
before it (engine/models/decoder.py's RMSNorm: float32 statistics, the normalised value rounded to the
model dtype before the weight), SiLU(gate) * up (its MLP), engine/models/rope.py's apply_rope
(also over q and k side by side in the qkv projection, apply_rope_fast's place in float32), and
kernels/paged_attention.py's store_kv_reference (a step's keys and values into the paged cache), and
engine/sampler.py's greedy choice (the first index of each row's largest logit, a NaN row marked). Why: on
CPU each PyTorch op of a step is a pass over the activations; these take 3-7 ops each (a small gain on
the whole engine: 1.02x on a no-sharing job, bench/results/raw_engine_ab_cpu_fused_ops.json), and
store_kv's index_copy_ runs on one thread; torch.max over a step's logits ([160, 8192]) took ~0.3 ms.

They live in the library kernels/cpu_library.py builds (one build, one switch: BATCHLLM_NATIVE_KERNELS);
`fused_ops_usable` says whether a tensor can take them, else callers keep the PyTorch ops. float32 and
bfloat16.
"""
from __future__ import annotations

import torch

from kernels import cpu_library

__all__ = ["fused_ops_usable", "native_greedy_tokens", "native_greedy_tokens_usable", "native_rms_norm", "native_rope",
           "native_silu_mul", "native_store_kv", "native_store_kv_usable"]


def fused_ops_usable(x: torch.Tensor) -> bool:
    """Whether the compiled ops can take `x` (a CPU tensor of a supported dtype, no autograd) here."""
    return (x.is_cpu and x.dtype in cpu_library.LIBRARY_DTYPES and not (x.requires_grad and torch.is_grad_enabled())
            and cpu_library.native_library() is not None)


def native_rms_norm(
    x: torch.Tensor,  # [rows, dim]
    weight: torch.Tensor,  # [dim], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [rows, dim]: added to x first
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x) * weight, None), or with a residual (norm(residual + x) * weight, residual + x)."""
    library = cpu_library.native_library()
    assert library is not None and x.dim() == 2 and weight.dtype == x.dtype
    x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty_like(x)
    new_residual = None
    if residual is not None:
        residual = residual.contiguous()
        assert residual.shape == x.shape and residual.dtype == x.dtype
        new_residual = torch.empty_like(x)
    cpu_library.entry_point(library, "rms_norm", x.dtype)(
        x.data_ptr(), None if residual is None else residual.data_ptr(),
        None if new_residual is None else new_residual.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0],
        x.shape[1], eps)
    return out, new_residual


def native_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate | up) -> [rows, inter]: silu(gate) * up."""
    library = cpu_library.native_library()
    assert library is not None and gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    cpu_library.entry_point(library, "silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), out.shape[0],
                                                          out.shape[1])
    return out


def native_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """engine/models/rope.py's apply_rope with cos / sin = table[positions] in x's dtype: x [rows, heads,
    head_dim] (rows any stride, heads and dims contiguous), positions [rows] int64, table [max_positions,
    2, rotary_dim] float32 (cos, sin; rotary_dim <= head_dim, the rest passes through) -> a new contiguous
    [rows, heads, head_dim]."""
    library = cpu_library.native_library()
    rows, heads, dim = x.shape
    rot = table.shape[-1]
    assert library is not None and table.dtype == torch.float32 and rot % 2 == 0 and rot <= dim
    assert x.stride()[1:] == (dim, 1) and table.shape[1] == 2 and table.is_contiguous()
    positions = positions.to(torch.int64).contiguous()
    assert positions.shape == (rows,)
    out = torch.empty(rows, heads, dim, dtype=x.dtype)
    cpu_library.entry_point(library, "rope", x.dtype)(x.data_ptr(), x.stride(0), positions.data_ptr(), table.data_ptr(),
                                               out.data_ptr(), rows, heads, dim, rot)
    return out


def native_store_kv_usable(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether `native_store_kv` can take these tensors (else kernels.paged_attention.store_kv_reference)."""
    width = k_cache.shape[-2] * k_cache.shape[-1]

    def rows_of_width(x: torch.Tensor) -> bool:  # [tokens, kv_heads, head_dim], each token's heads contiguous
        return x.dim() == 3 and x.shape[1] * x.shape[2] == width and x.stride(2) == 1 and x.stride(1) == x.shape[2]

    return (fused_ops_usable(key) and key.dtype == value.dtype == k_cache.dtype and k_cache.is_cpu
            and k_cache.is_contiguous()
            and rows_of_width(key) and rows_of_width(value) and slot_mapping.dtype == torch.int64
            and slot_mapping.is_cpu)


def native_store_kv(
    key: torch.Tensor,  # [tokens, kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [tokens] int64; -1: not stored
) -> None:
    """The cache's slots get the tokens' keys and values: store_kv_reference in one parallel pass (PyTorch's
    index_copy_ copies on one thread)."""
    library = cpu_library.native_library()
    assert library is not None and native_store_kv_usable(key, value, k_cache, slot_mapping)
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype and v_cache.is_contiguous()
    slots = slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    out_of_range = cpu_library.entry_point(library, "store_kv", key.dtype)(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), slots.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), key.shape[0], k_cache.shape[-2] * k_cache.shape[-1], num_slots)
    if out_of_range:
        raise IndexError(f"{out_of_range} slot(s) of the step are outside the KV cache's {num_slots} slots")


def native_greedy_tokens_usable(logits: torch.Tensor) -> bool:
    """Whether `native_greedy_tokens` can take these logits (else torch.max)."""
    return (logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[0] > 0 and logits.shape[1] > 0
            and logits.stride(1) == 1 and fused_ops_usable(logits))


def native_greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] float32 (rows any stride) -> [rows] int64: each row's first index of its largest
    value, as torch.max(dim=-1).indices, or -1 for a row holding a NaN."""
    library = cpu_library.native_library()
    assert library is not None and native_greedy_tokens_usable(logits)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    library.greedy_tokens_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr())
    return out
