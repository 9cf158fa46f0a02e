"""Per-step context: what every attention layer of one forward pass needs to find its KV."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_backend import AttentionBackend, StepAttentionMetadata


@dataclass(frozen=True)
class StepContext:
    backend: AttentionBackend
    kv_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (k_cache, v_cache)
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token
    attention_meta: StepAttentionMetadata  # built once per step, reused by every layer

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        # window: the layer's sliding window (None: full causal attention); softcap: the layer's
        # attention logit soft-capping (None: none)
        k_cache, v_cache = self.kv_caches[layer]
        self.backend.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return self.backend.attention(q, k_cache, v_cache, self.attention_meta, scale, key=k, value=v, window=window,
                                      softcap=softcap)
