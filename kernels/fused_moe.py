"""Mixture-of-experts MLP as grouped GEMMs (Triton kernel, launcher, reference).

    out[t] = sum_j weights[t, j] * down[e] @ (silu(g) * u),   (g | u) = gate_up[e] @ x[t],  e = experts[t, j]

x: [num_tokens, hidden]; weights, experts: [num_tokens, k]; gate_up: [num_experts, 2 * inter, hidden]
(gate rows then up rows); down: [num_experts, hidden, inter]. The (token, expert) pairs are sorted by
expert and each expert's pairs padded to whole BLOCK_M row blocks, so every row block of a GEMM
multiplies by one expert's weights: one launch covers all experts, and an expert no token picked
costs nothing. The GEMMs accumulate in float32; silu(g) * u is rounded to x's dtype between them,
and the k weighted outputs of a token are added in float32 in expert order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_attention import SUPPORTED_DTYPES, dot_precision

__all__ = ["fused_moe", "fused_moe_reference"]

BLOCK_M = 16  # pair rows per program; each expert's pairs are padded to a multiple of it


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [a_rows, K] contiguous
    row_ptr,  # [num_slots] int64: the row of `a` each slot multiplies; -1 for padding
    block_expert_ptr,  # [num_slots // BLOCK_M] int64: the expert of each row block
    w_ptr,  # [num_experts, N, K] contiguous
    scale_ptr,  # [num_slots] float32 per-slot output factor; ignored unless HAS_SCALE
    out_ptr,  # [num_slots, N] contiguous
    N,
    K,
    HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    slots = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(row_ptr + slots)
    expert = tl.load(block_expert_ptr + block)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] >= 0) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + expert * N * K + cols[None, :] * K + ks[:, None],
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)  # a and w share the model dtype
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slots)[:, None]
    tl.store(out_ptr + slots[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] >= 0) & (cols[None, :] < N))


def _grouped_gemm(a: torch.Tensor, rows: torch.Tensor, block_expert: torch.Tensor, w: torch.Tensor,
                  scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[s] = a[rows[s]] @ w[block_expert[s // BLOCK_M]].T (times scale[s]); padding slots stay 0."""
    n, k = w.shape[1], w.shape[2]
    out = torch.zeros(rows.shape[0], n, dtype=out_dtype, device=a.device)
    if rows.shape[0] == 0:
        return out
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (rows.shape[0] // BLOCK_M, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](a, rows, block_expert, w, rows if scale is None else scale, out, n, k,
                               HAS_SCALE=scale is not None,
                               DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _padded_slots(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair index of each slot, -1 for padding; expert of each BLOCK_M block), pairs sorted by expert."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_starts = torch.cumsum(padded, 0) - padded
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    slot_of_pair = padded_starts[sorted_experts] + torch.arange(len(flat), device=flat.device) - starts[sorted_experts]
    pair_of_slot = torch.full((int(padded.sum()),), -1, dtype=torch.int64, device=flat.device)
    pair_of_slot[slot_of_pair] = order
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // BLOCK_M)
    return pair_of_slot, block_expert


def fused_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor) -> torch.Tensor:
    """The mixture's output [num_tokens, hidden] in x's dtype; see the module docstring."""
    if x.dtype not in SUPPORTED_DTYPES or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"x, gate_up and down must share one dtype of {SUPPORTED_DTYPES}; got "
                         f"{x.dtype}, {gate_up.dtype}, {down.dtype}")
    num_experts, two_inter, hidden = gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or down.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}")
    if weights.shape != experts.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and experts {tuple(experts.shape)} must be [num_tokens, k]")
    k = experts.shape[1]
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    pair_of_slot, block_expert = _padded_slots(experts, num_experts)
    valid = pair_of_slot >= 0
    token_of_slot = torch.where(valid, pair_of_slot // k, -1)
    h = _grouped_gemm(x, token_of_slot, block_expert, gate_up, None, x.dtype)  # [num_slots, 2 * inter]
    gate, up = h.split(two_inter // 2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).contiguous()
    slot_rows = torch.where(valid, torch.arange(len(pair_of_slot), device=x.device), -1)
    scale = torch.where(valid, weights.reshape(-1).float()[pair_of_slot.clamp(min=0)], 0.0)
    y = _grouped_gemm(act, slot_rows, block_expert, down, scale, torch.float32)  # [num_slots, hidden]
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_slot[valid], y[valid])
    return out.to(x.dtype)


def fused_moe_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch with each pair's expert weights gathered (memory-hungry; for tests)."""
    inter = down.shape[-1]
    h = torch.einsum("th,tjnh->tjn", x.float(), gate_up[experts].float()).to(x.dtype)
    gate, up = h.split(inter, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).float()
    y = torch.einsum("tjn,tjhn->tjh", act, down[experts].float())
    return (y * weights.float()[..., None]).sum(1).to(x.dtype)
