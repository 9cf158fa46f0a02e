"""Triton KV store (interpreter on CPU) equals `store_kv_reference`, bit for bit."""
from __future__ import annotations

import pytest
import torch

from kernels.store_kv import store_kv, store_kv_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(1, 16, 1), (2, 80, 16), (3, 32, 5), (8, 128, 16)])
def test_store_kv_matches_reference(dtype: torch.dtype, kv_heads: int, head_dim: int, block_size: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    num_tokens = 11
    num_blocks = -(-num_tokens // block_size) + 2
    # key/value as strided views of a fused projection, as the model produces them
    fused = torch.randn(num_tokens, 3, kv_heads, head_dim, generator=g).to(dtype)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[2, 7]] = -1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    expected = cache.clone()
    store_kv_reference(key, value, expected[0], expected[1], slots)
    store_kv(key, value, cache[0], cache[1], slots)
    assert torch.equal(cache, expected)
    store_kv(key[:0], value[:0], cache[0], cache[1], slots[:0])  # empty step: no-op
    store_kv(key, value, cache[0], cache[1], slots.int())
    assert torch.equal(cache, expected)


def test_store_kv_rejects_bad_shapes() -> None:
    cache = torch.zeros(4, 8, 2, 16)
    key = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match="key/value"):
        store_kv(key[:, :1], key[:, :1], cache, cache.clone(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, key, cache, cache.clone(), torch.zeros(3))
    with pytest.raises(ValueError, match="dtype|are"):
        store_kv(key.half(), key.half(), cache, cache.clone(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="k_cache"):
        store_kv(key, key, cache, cache[:2], torch.zeros(3, dtype=torch.int64))
