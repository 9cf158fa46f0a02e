"""The CPU RoPE form (three ops, q and k rotated together in the qkv buffer) against the reference."""
from __future__ import annotations

import torch

from engine.model_config import RopeConfig
from engine.models.rope import apply_rope, apply_rope_fast, rope_cache


def test_fast_rope_matches_reference_on_a_strided_qk_view() -> None:
    torch.manual_seed(0)
    tokens, heads, kv_heads, head_dim = 37, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    table = rope_cache(RopeConfig(rope_type="default", theta=10000.0), head_dim, 4096)
    positions = torch.randint(0, 4096, (tokens,))
    cos, sin = table[positions][:, 0:1], table[positions][:, 1:2]
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)  # strided: v follows
    got = apply_rope_fast(qk, cos, sin)
    q_ref = apply_rope(qk[:, :heads].contiguous(), cos, sin)
    k_ref = apply_rope(qk[:, heads:].contiguous(), cos, sin)
    torch.testing.assert_close(got[:, :heads], q_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(got[:, heads:], k_ref, rtol=0, atol=2e-6)

