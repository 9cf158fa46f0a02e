"""The PyTorch backend's group prefill (members' prefill chunks after their group's prefix, the prefix
read once per group) gives paged attention's result: odd shapes, several groups of different prefix
lengths, chunks mid-suffix, GQA, sliding windows and soft-capping, beside decode rows and plain chunks."""
from __future__ import annotations

import random

import pytest
import torch

from kernel_cases import make_decode_scenario
from kernels.attention_backend import TorchBackend
from kernels.paged_attention import build_paged_batch, paged_attention_reference


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch):
    """These tests are about the batched PyTorch path, which machines without the compiled attention
    (kernels/cpu_prefill.py, tested in test_cpu_prefill.py) run: keep the kernel from taking the chunks."""
    from kernels import cpu_library
    monkeypatch.setattr(cpu_library, "native_library", lambda: None)


def _step(seed: int, heads: int, kv_heads: int, bs: int):
    """Two groups (prefixes of 13 and 37 tokens, the first ending mid-block) whose members run prefill
    chunks of different lengths (some their whole suffix, some its last part), one member decoding,
    and two rows without a group (a prefill chunk and a decode), in shuffled order."""
    sc = make_decode_scenario(seed, [(13, [9, 3, 21, 2]), (37, [5, 1, 17])], [19, 8], heads, kv_heads, 16, bs)
    rng = random.Random(seed)
    chunks = []
    for i, ctx in enumerate(sc.context_lens):
        plen = sc.prefix_lens[i] if sc.group_ids[i] is not None else 0
        own = ctx - plen
        ql = 1 if own == 1 or i == 6 else rng.randint(2, own)
        chunks.append(dict(ql=ql, ctx=ctx, table=sc.block_tables[i], gid=sc.group_ids[i], plen=plen))
    rng.shuffle(chunks)
    q = torch.randn(sum(c["ql"] for c in chunks), heads, 16, generator=torch.Generator().manual_seed(seed))
    return sc, chunks, q


@pytest.mark.parametrize("heads,kv_heads,bs", [(4, 4, 4), (8, 2, 16), (6, 2, 8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (None, 5.0), (12, None), (30, 3.0)])
def test_group_prefill_equals_paged_attention(heads: int, kv_heads: int, bs: int, window: int | None,
                                              softcap: float | None) -> None:
    sc, chunks, q = _step(heads + bs, heads, kv_heads, bs)
    backend = TorchBackend()
    lists = dict(query_lens=[c["ql"] for c in chunks], context_lens=[c["ctx"] for c in chunks],
                 block_tables=[c["table"] for c in chunks])
    meta = backend.build_step_metadata(**lists, block_size=bs, device="cpu", num_heads=heads, num_kv_heads=kv_heads,
                                       group_ids=[c["gid"] for c in chunks], prefix_lens=[c["plen"] for c in chunks],
                                       window=window)
    grouped_prefill = [c for c in chunks if c["gid"] is not None and c["ql"] > 1]
    assert meta.group_prefill is not None
    assert meta.group_prefill.token_rows.numel() == sum(c["ql"] for c in grouped_prefill)
    assert len(meta.group_prefill.suffix) >= 2  # chunks of 2 to 21 tokens: not all padded to the longest
    if window is None:  # both groups' prefixes read once, in the prefix part's buckets
        assert sum(b.num_groups for b in meta.group_prefill.buckets) == 2
    out = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window, softcap=softcap)
    plain = build_paged_batch(lists["query_lens"], lists["context_lens"], lists["block_tables"], bs,
                              torch.device("cpu"))
    expected = paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale, window=window, softcap=softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lone_member_chunk_and_chunks_reaching_into_the_prefix_stay_on_paged_attention() -> None:
    """A group's only prefill chunk in the step gains nothing from group prefill; a chunk whose
    queries start inside the prefix cannot use it."""
    sc = make_decode_scenario(3, [(12, [6, 9])], [], 4, 2, 16, 4)
    backend = TorchBackend()
    gid = sc.group_ids[0]
    lone = backend.build_step_metadata([4], [sc.context_lens[0]], [sc.block_tables[0]], 4, "cpu", num_heads=4,
                                       num_kv_heads=2, group_ids=[gid], prefix_lens=[12])
    assert lone.group_prefill is None and lone.paged is not None
    qls = [sc.context_lens[0] - 10, 3]  # the first chunk's queries start at position 10 < 12
    inside = backend.build_step_metadata(qls, sc.context_lens, sc.block_tables, 4, "cpu", num_heads=4,
                                         num_kv_heads=2, group_ids=[gid, gid], prefix_lens=[12, 12])
    assert inside.group_prefill is None and inside.paged is not None
    both = backend.build_step_metadata([2, 3], sc.context_lens, sc.block_tables, 4, "cpu", num_heads=4,
                                       num_kv_heads=2, group_ids=[gid, gid], prefix_lens=[12, 12])
    assert both.group_prefill is not None and both.paged is None
    assert len(both.group_prefill.suffix) == 1 and both.group_prefill.suffix_order is None  # no reordering
    q = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))
    plain = build_paged_batch([2, 3], sc.context_lens, sc.block_tables, 4, torch.device("cpu"))
    expected = paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale)
    torch.testing.assert_close(backend.attention(q, sc.k_cache, sc.v_cache, both, sc.scale), expected,
                               atol=1e-5, rtol=1e-5)
