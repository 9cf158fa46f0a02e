"""nn.Linear with its weight packed for oneDNN (kernels.cpu_linear): the CPU engine's linear layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_linear import pack_linear_weight, packed_linear

# A layer smaller than this (in x out) also keeps its dense weight, for single rows: there F.linear is
# one thread's matrix-vector product (4-20 us) while oneDNN wakes every thread (~50 us); from ~2M
# weights on, oneDNN is as fast or faster even for one row (bench/results/cpu_linear_cpu.json).
SINGLE_ROW_DENSE_BELOW = 1 << 21


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias, as the nn.Linear it replaces; CPU and inference only (the packed weight
    is an opaque oneDNN tensor: its numel is the dense weight's, but it cannot be read or saved)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(pack_linear_weight(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        small = weight.numel() < SINGLE_ROW_DENSE_BELOW
        # a buffer, not a parameter: the layer's parameter count stays the dense layer's
        self.register_buffer("dense_weight", weight.detach().contiguous() if small else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        if self.dense_weight is not None and x.shape[0] == 1:
            return F.linear(x, self.dense_weight, self.bias)
        return packed_linear(x, self.weight, self.bias)


def pack_linears(module: nn.Module) -> int:
    """Replaces every nn.Linear under `module` by a PackedLinear of the same weights, in place; returns
    how many. Each dense weight is freed once its packed copy exists (unless referenced elsewhere)."""
    packed = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                packed += 1
    return packed
