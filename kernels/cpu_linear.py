"""Linear layers on CPU through oneDNN, with each weight packed once into oneDNN's blocked layout.

Meaning: exactly `torch.nn.functional.linear(x, weight, bias)` (tests compare them); only the float
rounding of the sums differs. Why: `F.linear` on CPU runs float32 through MKL's sgemm, which on AMD
CPUs takes a code path without AVX-512 and re-packs the weight on every call; oneDNN's JIT kernels
use the CPU's widest vectors on any x86 vendor and read a weight packed ahead of time. Measured on a
2-core AMD EPYC with AVX-512 (bench/cpu_linear.py, bench/results/cpu_linear_cpu.json): float32 1.4-5.4x
as fast from 8 rows up (210 -> 490 GFLOP/s at 1,024 rows), bfloat16 1.04-1.1x from 64 rows up (PyTorch
already sends bfloat16 to oneDNN, unpacked) and 1.5-2.1x for a decode step's few rows against a 1B
model's weights. One row against a small weight is slower (oneDNN wakes every thread where F.linear
runs one): engine/models/packed_linear.py keeps small layers' dense weights for single rows.
This is what vLLM's CPU build does for its linear layers too.

A packed weight is an opaque oneDNN tensor (`is_mkldnn`): it has no storage to index, copy or save,
so the engine packs after loading, for inference only. float32 and bfloat16 (float16 needs AVX512-FP16
or AVX-NE-CONVERT, rare on CPUs: it keeps `F.linear`).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["PACKED_DTYPES", "pack_linear_weight", "packed_linear", "packed_linear_problem"]

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out_features, in_features] dense CPU weight -> the same weight in oneDNN's packed layout."""
    assert weight.device.type == "cpu" and weight.dim() == 2, (weight.device, weight.shape)
    # no batch-size hint: measured as fast as hints of 1, 64 or 1,024 rows for every row count
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., in_features] (any strides) -> [..., out_features], x's dtype (the weight's)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@lru_cache(maxsize=None)
def packed_linear_problem(dtype: torch.dtype) -> str | None:
    """None when packed linears work for `dtype` on this CPU, else why not (a short phrase). Checked
    once per process on a small layer against F.linear, so a oneDNN that is missing, or miscomputes
    on this CPU, leaves the model on F.linear instead of failing mid-run."""
    if dtype not in PACKED_DTYPES:
        return f"{str(dtype).removeprefix('torch.')} has no packed CPU linear"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 72, generator=gen).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    x = torch.randn(5, 72, generator=gen).to(dtype)
    try:
        got = packed_linear(x, pack_linear_weight(weight), bias).float()
    except RuntimeError as exc:
        return f"oneDNN refused it: {' '.join(str(exc).split())[:120]}"
    want = F.linear(x.float(), weight.float(), bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    if got.shape != want.shape or not torch.allclose(got, want, atol=tolerance, rtol=tolerance):
        return "oneDNN's result differed from F.linear's on this CPU"
    return None
