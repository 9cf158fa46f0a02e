"""Per-step context: what every attention layer of one forward pass needs to find its KV."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention import PagedBatch, paged_attention_reference, store_kv_reference


@dataclass(frozen=True)
class StepContext:
    kv_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (k_cache, v_cache)
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token
    paged: PagedBatch

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache = self.kv_caches[layer]
        store_kv_reference(k, v, k_cache, v_cache, self.slot_mapping)
        return paged_attention_reference(q, k_cache, v_cache, self.paged, scale)
