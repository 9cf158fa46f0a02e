"""Both attention backends give plain paged attention over a mixed step (prefill chunks, grouped
and ungrouped decode rows), and `select_backend` picks and refuses as documented."""
from __future__ import annotations

import random

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels.attention_backend import TorchBackend, TritonBackend, select_backend
from kernels.paged_attention import build_paged_batch, paged_attention_reference, store_kv_reference


def _mixed_step(seed: int, heads: int, kv_heads: int, dtype: torch.dtype = torch.float32):
    """Chunks over a cache with two groups; the ungrouped contexts become prefill chunks (their last
    few tokens are the queries), all in shuffled order. Returns the per-chunk lists and q."""
    sc = make_decode_scenario(seed, [(21, [3, 0, 9]), (8, [2, 5])], [17, 30, 4, 12], heads, kv_heads, 16, 4, dtype)
    rng = random.Random(seed)
    chunks = []
    for i in range(len(sc.context_lens)):
        ql = 1 if sc.group_ids[i] is not None or i % 2 else rng.randint(2, sc.context_lens[i])
        if sc.context_lens[i] == 1:
            ql = 1
        chunks.append(dict(ql=ql, ctx=sc.context_lens[i], table=sc.block_tables[i], gid=sc.group_ids[i],
                           plen=sc.prefix_lens[i]))
    rng.shuffle(chunks)
    num_tokens = sum(c["ql"] for c in chunks)
    q = torch.randn(num_tokens, heads, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return sc, chunks, q


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_step_attention_equals_plain_attention(backend_name: str, heads: int, kv_heads: int) -> None:
    sc, chunks, q = _mixed_step(heads, heads, kv_heads)
    backend = select_backend(backend_name, "cpu")
    assert backend.name == backend_name
    lists = dict(
        query_lens=[c["ql"] for c in chunks], context_lens=[c["ctx"] for c in chunks],
        block_tables=[c["table"] for c in chunks],
    )
    meta = backend.build_step_metadata(
        **lists, block_size=4, device="cpu", num_heads=heads, num_kv_heads=kv_heads,
        group_ids=[c["gid"] for c in chunks], prefix_lens=[c["plen"] for c in chunks],
    )
    assert meta.paged is not None and meta.shared is not None
    out = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale)
    plain = build_paged_batch(lists["query_lens"], lists["context_lens"], lists["block_tables"], 4, torch.device("cpu"))
    expected = paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # the same step without any group: every decode row is a plain row of the shared launch
    meta = backend.build_step_metadata(**lists, block_size=4, device="cpu", num_heads=heads, num_kv_heads=kv_heads)
    torch.testing.assert_close(backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_store_kv_and_partial_routes(backend_name: str) -> None:
    backend = select_backend(backend_name, "cpu")
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 5, 4, 2, 16, generator=g)
    key, value = torch.randn(6, 2, 16, generator=g), torch.randn(6, 2, 16, generator=g)
    slots = torch.tensor([3, 9, -1, 17, 0, 19])
    expected = cache.clone()
    store_kv_reference(key, value, expected[0], expected[1], slots)
    backend.store_kv(key, value, cache[0], cache[1], slots)
    assert torch.equal(cache, expected)
    # paged metadata for a subset of rows: only those rows of `out` change
    q = torch.randn(7, 4, 16, generator=g)
    meta = backend.build_paged_metadata([3, 1], [7, 5], [[2, 4], [1, 3]], 4, "cpu", num_heads=4, num_kv_heads=2,
                                        query_starts=[4, 1])
    out = torch.full_like(q, 9.0)
    backend.paged_attention(q, cache[0], cache[1], meta, 0.25, out=out)
    assert (out[[0, 2, 3]] == 9.0).all()
    plain = build_paged_batch([1, 3], [5, 7], [[1, 3], [2, 4]], 4, torch.device("cpu"))
    ref = paged_attention_reference(torch.cat([q[1:2], q[4:7]]), cache[0], cache[1], plain, 0.25)
    torch.testing.assert_close(out[[1, 4, 5, 6]], ref, atol=1e-5, rtol=1e-5)


def test_select_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(select_backend("auto", "cpu"), TorchBackend)
    assert isinstance(select_backend("torch", "cpu"), TorchBackend)
    assert isinstance(select_backend("triton", "cpu"), TritonBackend)  # conftest: TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", "cpu")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_short_prefill_chunks_of_a_group_use_its_tiles(backend_name: str, heads: int, kv_heads: int) -> None:
    """Members whose prefix is cached: short prefill chunks (a chunk spanning a block boundary, one
    of a single token, a long one that stays on paged attention) beside decode rows of the group."""
    bs, plen, head_dim = 4, 10, 16
    sc = make_decode_scenario(7, [(plen, [9, 3, 6, 30, 2])], [], heads, kv_heads, head_dim, bs)
    gid = sc.group_ids[0]
    # (query_len) per member: contexts are prefix + suffix; the chunk is the suffix's last tokens
    qls = [5, 1, 6, 30, 2]
    order = sorted(range(len(qls)), key=lambda i: sc.context_lens[i])
    chunks = [dict(ql=min(qls[k], sc.context_lens[i] - plen), ctx=sc.context_lens[i], table=sc.block_tables[i])
              for k, i in enumerate(order)]
    backend = select_backend(backend_name, "cpu")
    backend.group_prefill_max_rows = 64  # on for the PyTorch reference too: the meaning is the same
    backend.group_prefill_chunks = False  # per token through the shared launch (test_group_prefill_torch: whole chunks)
    lists = dict(query_lens=[c["ql"] for c in chunks], context_lens=[c["ctx"] for c in chunks],
                 block_tables=[c["table"] for c in chunks])
    q = torch.randn(sum(lists["query_lens"]), heads, head_dim, generator=torch.Generator().manual_seed(1))
    meta = backend.build_step_metadata(**lists, block_size=bs, device="cpu", num_heads=heads, num_kv_heads=kv_heads,
                                       group_ids=[gid] * len(chunks), prefix_lens=[plen] * len(chunks))
    shared = meta.shared.batch  # both backends plan on top of a SharedPrefixBatch
    ratio = heads // kv_heads
    routed = [c["ql"] for c in chunks if c["ql"] * ratio <= 64 and c["ctx"] - plen <= 64]
    assert shared.num_groups == 1 and shared.num_rows == sum(routed)  # every routed token is a group row
    assert (meta.paged is not None) == (len(routed) < len(chunks))
    out = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale)
    plain = build_paged_batch(lists["query_lens"], lists["context_lens"], lists["block_tables"], bs, torch.device("cpu"))
    torch.testing.assert_close(out, paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale),
                               atol=1e-5, rtol=1e-5)
