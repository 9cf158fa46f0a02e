"""The Triton grouped-GEMM mixture of experts (interpreter on CPU) against its PyTorch reference and
the engine's batched PyTorch experts."""
from __future__ import annotations

import pytest
import torch

from engine.model_config import MoeOptions
from engine.models.moe import grouped_experts, route
from kernels.fused_moe import fused_moe, fused_moe_reference

TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def _case(num_tokens: int, hidden: int, inter: int, num_experts: int, k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_tokens * 31 + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    weights, experts = route(torch.randn(num_tokens, num_experts, generator=g) * 2,
                             MoeOptions(num_experts, k, inter, True), dtype)
    return x, weights, experts, gate_up, down


# odd sizes: partial N and K tiles, expert groups that are not whole row blocks, unpicked experts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "hidden", "inter", "num_experts", "k"),
                         [(1, 24, 10, 5, 2), (7, 33, 17, 4, 3), (40, 20, 70, 6, 2)])
def test_fused_moe_equals_reference(dtype, num_tokens, hidden, inter, num_experts, k) -> None:
    case = _case(num_tokens, hidden, inter, num_experts, k, dtype)
    got, expected = fused_moe(*case), fused_moe_reference(*case)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_moe_equals_the_engine_experts() -> None:
    case = _case(13, 32, 24, 4, 2, torch.float32)
    torch.testing.assert_close(fused_moe(*case), grouped_experts(*case), atol=1e-4, rtol=1e-4)
