"""The shared-prefix decode reference equals plain paged attention (float32, 1e-5), and its parts
(attention with log-sum-exp, merging of attention states, the batch builder) do what they say."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import make_decode_scenario
from kernels.shared_prefix_attention import (
    attention_with_lse_reference,
    build_shared_prefix_batch,
    merge_attention_states,
    shared_prefix_decode_reference,
)

HEADS = [(2, 2), (4, 4), (4, 2), (8, 2), (8, 1), (16, 2)]  # GQA ratios 1, 1, 2, 4, 8, 8


def _random_case(seed: int) -> dict:
    rng = random.Random(seed)
    heads, kv_heads = HEADS[seed % len(HEADS)]
    block_size = rng.choice([1, 3, 4, 8, 16])
    groups = []
    for _ in range(rng.randint(1, 4)):
        size = rng.choice([1, 2, 3, 5, 8, 17, 64]) if rng.random() < 0.8 else rng.randint(1, 64)
        prefix = rng.choice([0, 1, block_size, 2 * block_size + 1, rng.randint(1, 40)])
        suffixes = [rng.choice([0, 1, rng.randint(0, 3 * block_size + 2)]) for _ in range(size)]
        if prefix == 0:
            suffixes = [max(s, 1) for s in suffixes]  # a context holds at least the query token
        groups.append((prefix, suffixes))
    ungrouped = [rng.randint(1, 30) for _ in range(rng.randint(0, 3))]
    return dict(
        groups=groups, ungrouped=ungrouped, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=rng.choice([4, 8, 16]), block_size=block_size,
    )


@pytest.mark.parametrize("seed", range(40))
def test_shared_prefix_decode_equals_plain_attention(seed: int) -> None:
    sc = make_decode_scenario(seed, **_random_case(seed))
    batch = build_shared_prefix_batch(
        sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens, sc.block_size, "cpu"
    )
    out = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale)
    expected = sc.expected()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,group_size,prefix,suffix",
    [
        (4, 4, 64, 37, 5),  # MHA, large group, prefix not a multiple of the block
        (8, 1, 64, 21, 0),  # GQA 8, every suffix empty (prefix = whole context)
        (4, 2, 1, 19, 3),  # group of one (demoted to a plain row)
        (8, 2, 2, 0, 7),  # prefix of 0 tokens
        (16, 4, 33, 64, 1),  # prefix a multiple of the block, one-token suffix
    ],
)
def test_edge_shapes(heads: int, kv_heads: int, group_size: int, prefix: int, suffix: int) -> None:
    rng = random.Random(prefix * 131 + group_size)
    suffixes = [suffix if i % 2 == 0 else rng.randint(0, 9) for i in range(group_size)]
    if prefix == 0:
        suffixes = [max(1, s) for s in suffixes]
    sc = make_decode_scenario(7, [(prefix, suffixes), (prefix + 3, [1, 2, 0])], [5], heads, kv_heads, 8, 8)
    for min_group_size in (1, 2):
        batch = build_shared_prefix_batch(
            sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens, 8, "cpu",
            min_group_size=min_group_size,
        )
        out = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale)
        torch.testing.assert_close(out, sc.expected(), atol=1e-5, rtol=1e-5)


def test_float16_close_to_float32() -> None:
    case = _random_case(3)
    sc16 = make_decode_scenario(3, **case, dtype=torch.float16)
    batch = build_shared_prefix_batch(
        sc16.query_rows, sc16.context_lens, sc16.block_tables, sc16.group_ids, sc16.prefix_lens, sc16.block_size, "cpu"
    )
    out = shared_prefix_decode_reference(sc16.q, sc16.k_cache, sc16.v_cache, batch, sc16.scale)
    assert out.dtype == torch.float16
    sc32 = make_decode_scenario(3, **case, dtype=torch.float16)
    ref = shared_prefix_decode_reference(sc32.q.float(), sc32.k_cache.float(), sc32.v_cache.float(), batch, sc32.scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_builder_groups_rows_and_demotes_small_groups() -> None:
    bs = 4
    tables = [[0, 1, 5], [0, 1, 6], [2, 3], [0, 1, 7], [9]]
    batch = build_shared_prefix_batch(
        query_rows=[10, 11, 12, 13, 14],
        context_lens=[10, 9, 6, 12, 3],
        block_tables=tables,
        group_ids=["a", "a", "b", "a", None],
        prefix_lens=[8, 8, 6, 8, 0],
        block_size=bs,
        device="cpu",
    )
    assert batch.host_group_row_starts == (0, 3)  # "b" has one member: a plain row
    assert batch.host_query_index == (10, 11, 13, 12, 14)
    assert batch.host_suffix_starts == (8, 8, 8, 0, 0)
    assert batch.host_prefix_lens == (8,)
    assert batch.prefix_block_tables.tolist() == [[0, 1]]
    # grouped rows ship only their own blocks (from the suffix's first block); plain rows whole tables
    assert batch.block_tables.tolist() == [[5, 0], [6, 0], [7, 0], [2, 3], [9, 0]]
    assert batch.table_starts.tolist() == [2, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="prefix length"):
        build_shared_prefix_batch([0, 1], [9, 9], [[0, 1, 2], [0, 1, 3]], [1, 1], [8, 7], bs, "cpu")
    with pytest.raises(ValueError, match="full blocks"):
        build_shared_prefix_batch([0, 1], [9, 9], [[0, 1, 2], [0, 4, 3]], [1, 1], [8, 8], bs, "cpu")
    with pytest.raises(ValueError, match="does not fit"):
        build_shared_prefix_batch([0], [9], [[0, 1]], [None], [0], bs, "cpu")
    empty = build_shared_prefix_batch([], [], [], [], [], bs, "cpu")
    q = torch.randn(2, 2, 4)
    out = shared_prefix_decode_reference(q, torch.zeros(1, bs, 1, 4), torch.zeros(1, bs, 1, 4), empty, 0.5)
    assert out.shape == q.shape and not out.any()


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_attention_with_lse_matches_sdpa(ratio: int) -> None:
    g = torch.Generator().manual_seed(ratio)
    q = torch.randn(2, 2 * ratio, 5, 8, generator=g)
    k = torch.randn(2, 2, 11, 8, generator=g)
    v = torch.randn(2, 2, 11, 8, generator=g)
    out, lse = attention_with_lse_reference(q, k, v, 0.3, causal_offset=6)
    kk, vv = k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1)
    mask = torch.arange(11)[None, :] <= torch.arange(6, 11)[:, None]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3))
    scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_attention_with_lse_empty_rows() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    mask = torch.tensor([True, False, False])[None, None, :, None].expand(1, 2, 3, 5)
    out, lse = attention_with_lse_reference(q, k, k, 1.0, mask=mask)
    assert torch.isfinite(out).all() and not out[:, :, 1:].any()
    assert torch.isinf(lse[:, :, 1:]).all() and torch.isfinite(lse[:, :, 0]).all()
    out, lse = attention_with_lse_reference(q, k[:, :, :0], k[:, :, :0], 1.0)
    assert not out.any() and (lse == float("-inf")).all()


def test_merge_of_split_keys_equals_whole() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 2, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g)
    whole, whole_lse = attention_with_lse_reference(q, k, v, 0.5)
    for cut in (0, 1, 7, 20):
        oa, la = attention_with_lse_reference(q, k[:, :, :cut], v[:, :, :cut], 0.5)
        ob, lb = attention_with_lse_reference(q, k[:, :, cut:], v[:, :, cut:], 0.5)
        out, lse = merge_attention_states(oa, la, ob, lb)
        torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, whole_lse)
    empty = torch.full((2,), float("-inf"))
    out, lse = merge_attention_states(torch.zeros(2, 3), empty, torch.zeros(2, 3), empty)
    assert not out.any() and (lse == float("-inf")).all()
