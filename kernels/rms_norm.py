"""Fused residual add + RMSNorm (Triton kernel, launcher, reference).

    new_residual = x + residual                                   (in x's dtype)
    normed = weight * (h32 * rsqrt(mean(h32 ** 2) + eps)).to(dtype)   with h32 = new_residual.float()

which is `engine.models.decoder.RMSNorm` applied to `x + residual`: statistics in float32, the
normalised row rounded to the model dtype, then multiplied by the weight in that dtype. One pass
over the rows instead of the add, pow, mean, rsqrt, two muls and casts of the unfused code.

x: [num_rows, hidden] or [num_tokens, num_heads, head_dim] (the Qwen3 q/k norm, rows = heads) with a
contiguous last dimension and any outer strides (e.g. q and k as views of a fused qkv output).
Outputs are new contiguous tensors; the inputs are not written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_attention import SUPPORTED_DTYPES

__all__ = ["fused_add_rms_norm", "rms_norm", "fused_add_rms_norm_reference", "rms_norm_reference"]

MAX_HIDDEN = 65536  # one row is one register tile; longer rows would need a two-pass loop
_TILE_ELEMS = 4096  # elements per program: several short rows (q/k norm) share one program


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # ignored unless HAS_RESIDUAL
    w_ptr,
    out_ptr,  # [num_rows, hidden] contiguous
    res_out_ptr,  # [num_rows, hidden] contiguous; ignored unless HAS_RESIDUAL
    num_rows,
    inner,  # rows per outer index (num_heads for 3-D inputs, 1 for 2-D)
    stride_xo,
    stride_xi,
    stride_ro,
    stride_ri,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < hidden)
    outer, within = rows // inner, rows % inner
    x = tl.load(x_ptr + (outer * stride_xo + within * stride_xi)[:, None] + cols[None, :], mask=mask, other=0.0)
    dst = rows[:, None] * hidden + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (outer * stride_ro + within * stride_ri)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = x + r  # in the input dtype, as the unfused code adds
        tl.store(res_out_ptr + dst, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(h * h, axis=1) / hidden + eps)  # [BLOCK_M]
    normed = (h * inv[:, None]).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0)
    # weight * normed in the model dtype: the float32 product of two 16-bit floats is exact, so one
    # rounding gives what PyTorch's 16-bit multiply gives
    tl.store(out_ptr + dst, (w[None, :].to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask)


def _rows_view(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(inner, stride_outer, stride_inner) addressing t's rows; t is 2-D or 3-D, last dim contiguous."""
    if t.dim() not in (2, 3) or (t.stride(-1) != 1 and t.shape[-1] > 1):
        raise ValueError(f"{name} must be [rows, hidden] or [tokens, heads, head_dim] with a contiguous last "
                         f"dimension; got shape {tuple(t.shape)} strides {t.stride()}")
    if t.dim() == 2:
        return 1, t.stride(0), 0
    return t.shape[1], t.stride(0), t.stride(1)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    inner, sxo, sxi = _rows_view(x, "x")
    hidden = x.shape[-1]
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x is {x.dtype}; the fused RMSNorm supports {SUPPORTED_DTYPES}")
    if weight.shape != (hidden,) or weight.dtype != x.dtype or (weight.stride(0) != 1 and hidden > 1):
        raise ValueError(f"weight must be a contiguous [{hidden}] {x.dtype} tensor like x's rows; "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"rows of {hidden} elements are not supported (1 to {MAX_HIDDEN})")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    sro = sri = 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}); "
                             f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
        _, sro, sri = _rows_view(residual, "residual")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    num_rows = x.numel() // hidden
    if num_rows == 0:
        return out, res_out
    block_n = triton.next_power_of_2(hidden)
    block_m = min(max(1, _TILE_ELEMS // block_n), triton.next_power_of_2(num_rows))
    _rms_norm_kernel[(triton.cdiv(num_rows, block_m),)](
        x,
        x if residual is None else residual,
        weight,
        out,
        out if res_out is None else res_out,
        num_rows,
        inner,
        sxo,
        sxi,
        sro,
        sri,
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=min(16, max(1, block_m * block_n // 256)),
    )
    return out, res_out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden] (or [tokens, heads, head_dim])
    residual: torch.Tensor,  # like x
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = x + residual; see the module docstring."""
    normed, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return normed, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's rows (the same kernel without the residual add)."""
    return _launch(x, None, weight, eps)[0]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The decoder's RMSNorm, verbatim."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = residual + x
    return rms_norm_reference(new_residual, weight, eps), new_residual
