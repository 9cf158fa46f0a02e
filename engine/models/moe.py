"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router picks each token's top-k experts
and the experts run as one batched computation over stacked weights, not one call per expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import ModelConfig, MoeOptions


def route(router_logits: torch.Tensor, moe: MoeOptions, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_tokens, num_experts] logits -> (weights [num_tokens, k] in `dtype`, expert ids [num_tokens, k]):
    softmax over all experts in float32, top-k, renormalised when norm_topk_prob (as transformers)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, moe.experts_per_token, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for every token t, as two batched matmuls.

    x: [num_tokens, hidden]; weights, experts: [num_tokens, k]; gate_up: [num_experts, 2 * inter, hidden]
    (gate rows then up rows); down: [num_experts, hidden, inter]. The (token, expert) pairs are sorted
    by expert and packed into one zero-padded row block per expert that any token chose, so the
    experts no token chose cost nothing. Each token's outputs are added in increasing expert order,
    the order transformers adds them in."""
    num_tokens, k = experts.shape
    inter = down.shape[-1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in expert order
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    used = torch.nonzero(counts).squeeze(1)  # [num_used] expert ids in increasing order
    used_counts = counts[used]
    group = torch.repeat_interleave(torch.arange(len(used), device=x.device), used_counts)  # per sorted pair
    slot = torch.arange(len(flat), device=x.device) - (torch.cumsum(used_counts, 0) - used_counts)[group]
    tokens = order // k
    rows = x.new_zeros(len(used), int(used_counts.max()) if len(used) else 0, x.shape[1])
    rows[group, slot] = x[tokens]
    all_used = len(used) == gate_up.shape[0]  # then no copy of the expert weights
    gate_up_used = gate_up if all_used else gate_up[used]
    down_used = down if all_used else down[used]
    gate, up = torch.bmm(rows, gate_up_used.transpose(1, 2)).split(inter, dim=-1)
    out = torch.bmm(F.silu(gate) * up, down_used.transpose(1, 2))  # [num_used, capacity, hidden]
    pair_out = out[group, slot] * weights.reshape(-1)[order, None]
    return x.new_zeros(num_tokens, x.shape[1]).index_add_(0, tokens, pair_out)


class Experts(nn.Module):
    """The stacked expert weights, named as transformers 5 names them (`experts.gate_up_proj`, `.down_proj`)."""

    def __init__(self, moe: MoeOptions, hidden_size: int) -> None:
        super().__init__()
        inter = moe.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden_size, inter))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.family.moe is not None
        self.moe = cfg.family.moe
        self.gate = nn.Linear(cfg.hidden_size, self.moe.num_experts, bias=False)  # the router
        self.experts = Experts(self.moe, cfg.hidden_size)
        self.fused = False  # the experts as Triton grouped GEMMs (kernels.fused_moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]
        weights, experts = route(self.gate(x), self.moe, x.dtype)
        if self.fused:
            from kernels.fused_moe import fused_moe  # lazy: Triton only once fused kernels are enabled

            return fused_moe(x, weights, experts, self.experts.gate_up_proj, self.experts.down_proj)
        return grouped_experts(x, weights, experts, self.experts.gate_up_proj, self.experts.down_proj)
