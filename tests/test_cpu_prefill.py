"""The compiled CPU prefill attention (kernels/cpu_prefill.py) equals its definition, and the engine runs it.

Definition: `paged_attention_reference` for prefill spans, and `dense_prefill` (float64, one query at a
time) for sliding windows and soft-capping. Cases: spans that start and end mid-block, chunks that
continue a cached context, whole prompts, a span longer than the kernel's 32-token tiles and 64-key
blocks, GQA ratios 1-8, head sizes 4-256, blocks of 1 to 100 tokens, NaN in every unwritten cache slot,
chunks placed at given rows of q; bfloat16 within bfloat16's rounding of the inputs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernel_cases import dense_prefill, make_prefill_scenario
from kernels import cpu_library
from kernels.cpu_prefill import native_prefill_usable
from kernels.paged_attention import build_paged_batch
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch

needs_kernel = pytest.mark.skipif(cpu_library.native_library_problem() is not None,
                                  reason=f"compiled attention unavailable: {cpu_library.native_library_problem()}")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# (query_len, context_len): whole prompts, chunks continuing a context, mid-block edges, one long span
SPANS = [(9, 9), (6, 21), (19, 40), (3, 8), (30, 30), (2, 2), (77, 150), (130, 130)]


def _prefill(sc, window=None, softcap=None, dtype=torch.float32, out=None):
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, sc.block_size, torch.device("cpu"),
                              window=window)
    q, k, v = sc.q.to(dtype), sc.k_cache.to(dtype), sc.v_cache.to(dtype)
    out = torch.full_like(q, 5.0) if out is None else out
    assert native_prefill_usable(q, k, out)
    return paged_attention_torch(q, k, v, plan_paged_torch(batch), sc.scale, out, window=window, softcap=softcap)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 64, 16), (2, 2, 16, 8), (8, 1, 32, 4), (6, 2, 48, 7), (4, 4, 128, 1), (2, 1, 256, 100), (16, 2, 64, 16)])
def test_equals_reference(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    sc = make_prefill_scenario(heads + block_size, SPANS, heads, kv_heads, head_dim, block_size)
    out = _prefill(sc)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sc.expected(), atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_windows_and_soft_capping_equal_the_definition(window: int, softcap: float | None) -> None:
    sc = make_prefill_scenario(window, SPANS, 4, 2, 32, 8)
    out = _prefill(sc, window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), dense_prefill(sc, window, softcap), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 64, 16), (6, 2, 48, 7), (8, 1, 32, 4), (2, 1, 256, 100), (3, 3, 4, 5), (4, 2, 80, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, 3.0), (40, None)])
def test_bfloat16_within_its_rounding(heads: int, kv_heads: int, head_dim: int, block_size: int,
                                      window: int | None, softcap: float | None) -> None:
    """bfloat16 runs the dot-product path where the CPU has it (pairs of head_dim and of keys: odd key
    counts per block, head sizes off a multiple of 32, scaled scores, windows and capping all count)."""
    sc = make_prefill_scenario(3 + head_dim, SPANS, heads, kv_heads, head_dim, block_size)
    out = _prefill(sc, window=window, softcap=softcap, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    rounded = dataclasses.replace(sc, q=sc.q.bfloat16().float(), k_cache=sc.k_cache.bfloat16().float(),
                                  v_cache=sc.v_cache.bfloat16().float())
    expected = rounded.expected() if window is None and softcap is None else dense_prefill(rounded, window, softcap)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[torch.bfloat16],
                               rtol=TOLERANCE[torch.bfloat16])


@needs_kernel
def test_rows_outside_the_spans_are_untouched() -> None:
    sc = make_prefill_scenario(2, [(5, 18), (3, 3)], 8, 2, 16, 8)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 8, torch.device("cpu"))
    # the two chunks at rows 2..6 and 9..11 of a 13-row q
    q = torch.randn(13, 8, 16)
    q[2:7], q[9:12] = sc.q[:5], sc.q[5:]
    moved = dataclasses.replace(batch, prefill_spans=((2, 5, 18), (9, 3, 3)))
    out = paged_attention_torch(q, sc.k_cache, sc.v_cache, plan_paged_torch(moved), sc.scale, torch.full_like(q, 7.0))
    keep = torch.ones(13, dtype=torch.bool)
    keep[2:7], keep[9:12] = False, False
    assert (out[keep] == 7.0).all()
    torch.testing.assert_close(out[~keep], sc.expected(), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("head_dim", [4, 24, 80, 100])
def test_head_sizes_off_the_vector_width(head_dim: int) -> None:
    """Head sizes that are no multiple of the kernel's 16 lanes: the last dimensions one at a time."""
    sc = make_prefill_scenario(head_dim, [(9, 9), (6, 21), (70, 70)], 4, 2, head_dim, 8)
    out = _prefill(sc)
    torch.testing.assert_close(out, sc.expected(), atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("window,softcap", [(None, None), (12, 3.0)])
def test_group_members_prefill_chunks_run_in_the_kernel(monkeypatch, window: int | None, softcap: float | None) -> None:
    """Plan mode's members' chunks after their group's prefix (kernels/group_prefill_torch.py) run as
    plain spans of the kernel, not the batched PyTorch parts, with the reference's results."""
    import kernels.group_prefill_torch as group_prefill
    from kernels.attention_backend import TorchBackend
    from kernels.paged_attention import paged_attention_reference
    from test_group_prefill_torch import _step

    def batched_path_ran(*args, **kwargs):
        raise AssertionError("the batched PyTorch path ran")

    monkeypatch.setattr(group_prefill, "prefix_part", batched_path_ran)
    sc, chunks, q = _step(11, 8, 2, 16)
    backend = TorchBackend()
    lists = dict(query_lens=[c["ql"] for c in chunks], context_lens=[c["ctx"] for c in chunks],
                 block_tables=[c["table"] for c in chunks])
    meta = backend.build_step_metadata(**lists, block_size=16, device="cpu", num_heads=8, num_kv_heads=2,
                                       group_ids=[c["gid"] for c in chunks], prefix_lens=[c["plen"] for c in chunks],
                                       window=window)
    assert meta.group_prefill is not None
    out = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window, softcap=softcap)
    plain = build_paged_batch(lists["query_lens"], lists["context_lens"], lists["block_tables"], 16, torch.device("cpu"))
    expected = paged_attention_reference(q, sc.k_cache, sc.v_cache, plain, sc.scale, window=window, softcap=softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
