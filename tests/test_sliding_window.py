"""Sliding-window attention (transformers' rule: the query at position p sees keys p - window < k <= p)
in every attention path equals the definition (`kernel_cases.dense_attention`, written per query in
float64): the PyTorch references, the CPU fast paths and the Triton kernels (interpreter on CPU),
for windows of one token, shorter than a block, odd, equal to a context and longer than any, with
GQA ratios 1-4 and odd block sizes. Blocks wholly before every query's window are poisoned with NaN:
a path that reads them fails. A layer may use a smaller window than its step's metadata was built
for (per-layer windows), and a group member sees exactly the prefix keys its own window reaches."""
from __future__ import annotations

import pytest
import torch

from kernel_cases import (
    DecodeScenario,
    PrefillScenario,
    dense_decode,
    dense_prefill,
    make_decode_scenario,
    make_prefill_scenario,
)
from kernels.attention_backend import select_backend
from kernels.paged_attention import build_paged_batch, first_visible_position, paged_attention_reference
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
# decode rows, whole prompts, chunks continuing a context, a one-token context
SPANS = [(1, 1), (1, 23), (9, 9), (6, 21), (19, 40), (3, 8), (1, 50), (20, 20)]
# groups (prefix, member suffixes): members far past their prefix see little or none of it
GROUPS = [(37, [3, 0, 5, 19, 1, 30]), (16, [0, 0]), (11, [4]), (5, [40, 2])]
UNGROUPED = [1, 9, 45]
# one token, shorter than a block, odd, equal to a context (40), longer than every context
WINDOWS = [1, 3, 13, 40, 1000]
SHAPES = [(4, 2, 16, 8), (6, 2, 8, 7), (4, 4, 16, 5), (8, 2, 16, 16)]  # heads, kv_heads, head_dim, block_size


def _poison_outside(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]], first_positions: list[int],
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with NaN in every block of table i that lies wholly before
    `first_positions[i]`, unless a table needs it at or after its own first position."""
    bs = k_cache.shape[1]
    needed = {b for t, p in zip(tables, first_positions) for b in t[p // bs:]}
    dead = [b for t, p in zip(tables, first_positions) for b in t[: p // bs] if b not in needed]
    assert dead, "the case must have blocks outside every window"
    k, v = k_cache.clone(), v_cache.clone()
    k[dead], v[dead] = float("nan"), float("nan")
    return k, v


def _poisoned_prefill(sc: PrefillScenario, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    firsts = [first_visible_position(c - ql, window) for ql, c in zip(sc.query_lens, sc.context_lens)]
    return _poison_outside(sc.k_cache, sc.v_cache, sc.block_tables, firsts)


def _poisoned_decode(sc: DecodeScenario, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's own table from its first visible position on is needed, and so is each group's one
    copy of its prefix (a member's partial last prefix block: the group reads the first member's
    copy) from its members' earliest visible position on."""
    batch = _decode_batch(sc)
    tables = [list(t) for t in sc.block_tables]
    firsts = [first_visible_position(c - 1, window) for c in sc.context_lens]
    starts = batch.host_group_row_starts
    for g, plen in enumerate(batch.host_prefix_lens):
        earliest = min(first_visible_position(c - 1, window) for c in batch.host_context_lens[starts[g]:starts[g + 1]])
        table = batch.prefix_block_tables[g, : -(-plen // sc.block_size)].tolist()
        tables.append(table)
        firsts.append(min(earliest, len(table) * sc.block_size))
    return _poison_outside(sc.k_cache, sc.v_cache, tables, firsts)


def _decode_batch(sc: DecodeScenario):
    return build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens,
                                     sc.block_size, "cpu")


# ---------------------------------------------------------------- PyTorch references and CPU paths

@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_paged_torch_paths_equal_the_definition(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    sc = make_prefill_scenario(heads + block_size, SPANS, heads, kv_heads, head_dim, block_size)
    for window in [None, *WINDOWS]:
        expected = dense_prefill(sc, window).float()
        # metadata for this window, and for a larger one (another layer's): both must serve it
        for batch_window in {window, None if window is None else window + 9}:
            batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, block_size,
                                      torch.device("cpu"), window=batch_window)
            ref = paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=window)
            torch.testing.assert_close(ref, expected, **TOL[torch.float32])
            out = paged_attention_torch(sc.q, sc.k_cache, sc.v_cache, plan_paged_torch(batch), sc.scale,
                                        torch.empty_like(sc.q), window=window)
            torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_shared_prefix_torch_paths_equal_the_definition(heads: int, kv_heads: int, head_dim: int,
                                                         block_size: int) -> None:
    sc = make_decode_scenario(heads * 5 + block_size, GROUPS, UNGROUPED, heads, kv_heads, head_dim, block_size)
    batch = _decode_batch(sc)
    rows = torch.tensor(sc.query_rows)
    for window in [None, *WINDOWS]:
        expected = dense_decode(sc, window).float()[rows]
        ref = shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=window)
        torch.testing.assert_close(ref[rows], expected, **TOL[torch.float32])
        for plan_window in {window, None if window is None else window + 9}:
            plan = plan_shared_prefix_torch(batch, plan_window, heads_per_kv=heads // kv_heads)
            out = torch.full_like(sc.q, 5.0)
            shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=out, window=window)
            torch.testing.assert_close(out[rows], expected, **TOL[torch.float32])


def test_torch_paths_do_not_read_blocks_outside_the_window() -> None:
    window = 6
    sc = make_prefill_scenario(3, SPANS, 4, 2, 16, 4)
    k, v = _poisoned_prefill(sc, window)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 4, torch.device("cpu"), window=window)
    out = paged_attention_torch(sc.q, k, v, plan_paged_torch(batch), sc.scale, torch.empty_like(sc.q), window=window)
    torch.testing.assert_close(out, dense_prefill(sc, window).float(), **TOL[torch.float32])

    sc = make_decode_scenario(4, GROUPS, UNGROUPED, 4, 2, 16, 4)
    k, v = _poisoned_decode(sc, window)
    rows = torch.tensor(sc.query_rows)
    plan = plan_shared_prefix_torch(_decode_batch(sc), window, heads_per_kv=2)
    out = shared_prefix_decode_torch(sc.q, k, v, plan, sc.scale, window=window)
    torch.testing.assert_close(out[rows], dense_decode(sc, window).float()[rows], **TOL[torch.float32])


def test_a_layer_window_larger_than_the_metadata_is_refused() -> None:
    sc = make_prefill_scenario(5, [(3, 20)], 2, 2, 8, 4)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 4, torch.device("cpu"), window=4)
    with pytest.raises(AssertionError):
        paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=8)
    with pytest.raises(AssertionError):
        paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale, window=None)


# ---------------------------------------------------------------- Triton kernels (interpreter)

# (dtype, heads, kv_heads, head_dim, block_size, windows): every window in float32, two in float16;
# kept few because the interpreter is slow
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size,windows",
                         [(torch.float32, 4, 2, 16, 8, [None, *WINDOWS]), (torch.float16, 6, 2, 8, 7, [3, 13])])
def test_paged_prefill_kernel(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int,
                              windows: list[int | None]) -> None:
    from kernels.paged_prefill import build_paged_prefill_metadata, paged_prefill

    sc = make_prefill_scenario(heads + block_size, SPANS, heads, kv_heads, head_dim, block_size, dtype)
    meta = build_paged_prefill_metadata(sc.query_lens, sc.context_lens, sc.block_tables, block_size, "cpu",
                                        heads, kv_heads)
    for window in windows:
        out = paged_prefill(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window)
        torch.testing.assert_close(out.float(), dense_prefill(sc, window).float(), **TOL[dtype])
    k, v = _poisoned_prefill(sc, 3)
    out = paged_prefill(sc.q, k, v, meta, sc.scale, window=3)
    torch.testing.assert_close(out.float(), dense_prefill(sc, 3).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size,windows",
                         [(torch.float32, 4, 2, 16, 8, [None, *WINDOWS]), (torch.float16, 6, 2, 8, 5, [3, 13])])
def test_shared_prefix_decode_kernel(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                     block_size: int, windows: list[int | None]) -> None:
    from kernels.shared_prefix_decode import plan_shared_prefix_decode, shared_prefix_decode

    sc = make_decode_scenario(heads + head_dim, GROUPS, UNGROUPED, heads, kv_heads, head_dim, block_size, dtype)
    batch = _decode_batch(sc)
    rows = torch.tensor(sc.query_rows)
    # several tiles per prefix and per row (merged by LSE), and one tile per part (direct writes)
    plans = [plan_shared_prefix_decode(batch, heads, kv_heads, kv_split=16),
             plan_shared_prefix_decode(batch, heads, kv_heads, kv_split=64, block_m=32)]
    for i, window in enumerate(windows):  # the two plans in turn (the interpreter is slow)
        expected = dense_decode(sc, window).float()[rows]
        out = shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, plans[i % 2], sc.scale, window=window,
                                   fused=i % 2 == 0)
        torch.testing.assert_close(out[rows].float(), expected, **TOL[dtype])
    k, v = _poisoned_decode(sc, 3)
    out = shared_prefix_decode(sc.q, k, v, plans[0], sc.scale, window=3)
    torch.testing.assert_close(out[rows].float(), dense_decode(sc, 3).float()[rows], **TOL[dtype])


# ---------------------------------------------------------------- a whole step through each backend

@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_backend_step_with_windows(backend_name: str) -> None:
    """A mixed step (prefill chunks, grouped decode rows, group members' short prefill chunks) built
    once for the largest window serves layers of every smaller window and of the largest."""
    heads, kv_heads, bs = 4, 2, 4
    sc = make_decode_scenario(9, GROUPS, [], heads, kv_heads, 16, bs)
    spans = [(1, 9), (6, 21), (19, 40), (3, 8)]  # (query_len, context_len) of four ungrouped chunks
    pre = make_prefill_scenario(10, spans, heads, kv_heads, 16, bs)
    # one cache holding both scenarios: the prefill scenario's blocks after the decode scenario's
    offset = sc.k_cache.shape[0]
    k_cache, v_cache = torch.cat([sc.k_cache, pre.k_cache]), torch.cat([sc.v_cache, pre.v_cache])
    chunks = [dict(ql=1, ctx=c, table=t, gid=g, plen=p)
              for c, t, g, p in zip(sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens)]
    # the first group's member with the longest suffix continues with a 3-token chunk (the Triton
    # backend runs it as group rows, one per query token)
    longest = max((c for c in chunks if c["gid"] == 0), key=lambda c: c["ctx"])
    longest["ql"] = 3
    chunks += [dict(ql=ql, ctx=c, table=[b + offset for b in t], gid=None, plen=0)
               for (ql, c), t in zip(spans, pre.block_tables)]
    num_tokens = sum(c["ql"] for c in chunks)
    q = torch.randn(num_tokens, heads, 16, generator=torch.Generator().manual_seed(3))
    backend = select_backend(backend_name, "cpu")
    largest = 13
    meta = backend.build_step_metadata(
        [c["ql"] for c in chunks], [c["ctx"] for c in chunks], [c["table"] for c in chunks], bs, "cpu",
        num_heads=heads, num_kv_heads=kv_heads, group_ids=[c["gid"] for c in chunks],
        prefix_lens=[c["plen"] for c in chunks], window=largest,
    )
    assert meta.paged is not None and meta.shared is not None
    if backend_name == "triton":  # every decode row, and the member's chunk as 3 group rows
        assert meta.shared.batch.num_rows == sum(c["ql"] == 1 for c in chunks) + 3
    whole = PrefillScenario(q, k_cache, v_cache, [c["ql"] for c in chunks], [c["ctx"] for c in chunks],
                            [c["table"] for c in chunks], bs, sc.scale)
    for window in (1, 5, largest):
        out = backend.attention(q, k_cache, v_cache, meta, sc.scale, window=window)
        torch.testing.assert_close(out, dense_prefill(whole, window).float(), **TOL[torch.float32])
