"""The Triton kernels on CUDA, compiled: bfloat16 (and float16) against the float32 references, at
model-sized shapes (head dims 64/80/96/128, GQA 1..8, prefix 2000, groups up to 128).

Skipped without CUDA. The kernels must be compiled, not interpreted: when this process runs with
TRITON_INTERPRET=1 (tests/conftest.py sets it for the CPU tests), the checks run in a subprocess
with TRITON_INTERPRET=0, i.e. `TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_kernels_gpu.py`.
KERNELS_GPU_TEST_ON_CPU=1 runs the same checks on CPU in the interpreter (float16, shrunken
shapes): it checks this file, not the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from compiled_rerun import rerun_gpu_tests_compiled

from kernel_cases import DecodeScenario, PrefillScenario, make_decode_scenario, make_prefill_scenario

ON_CPU = os.environ.get("KERNELS_GPU_TEST_ON_CPU") == "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAVE_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
DTYPES = [torch.float16] if ON_CPU else [torch.bfloat16, torch.float16]
SHRINK = 8 if ON_CPU else 1  # lengths and group sizes are divided by this on CPU
TOL = {torch.bfloat16: 2.5e-2, torch.float16: 4e-3}

pytestmark = pytest.mark.gpu
needs_compiled = pytest.mark.skipif(
    not ON_CPU and (not HAVE_CUDA or INTERPRETING),
    reason="needs CUDA and compiled kernels (run with TRITON_INTERPRET=0)",
)


def _n(x: int) -> int:
    return max(1, x // SHRINK)


@pytest.mark.skipif(ON_CPU or not HAVE_CUDA or not INTERPRETING, reason="runs only to re-launch this file compiled")
def test_gpu_checks_compiled_in_subprocess() -> None:
    rerun_gpu_tests_compiled(__file__)


def _to(sc, device: torch.device):
    sc.q, sc.k_cache, sc.v_cache = sc.q.to(device), sc.k_cache.to(device), sc.v_cache.to(device)
    return sc


def _expected(sc: DecodeScenario | PrefillScenario) -> torch.Tensor:
    """float32 reference on CPU from the same (rounded) inputs."""
    q, k, v = sc.q, sc.k_cache, sc.v_cache
    sc.q, sc.k_cache, sc.v_cache = q.float().cpu(), k.float().cpu(), v.float().cpu()
    try:
        return sc.expected()
    finally:
        sc.q, sc.k_cache, sc.v_cache = q, k, v


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.float().cpu()
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]} ({dtype})"


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(8, 128, 16), (2, 80, 32), (4, 96, 16), (1, 64, 1)])
def test_store_kv(dtype: torch.dtype, kv_heads: int, head_dim: int, block_size: int) -> None:
    from kernels.store_kv import store_kv, store_kv_reference

    g = torch.Generator().manual_seed(0)
    num_tokens = _n(700)
    num_blocks = -(-num_tokens // block_size) + 3
    fused = torch.randn(num_tokens, 3, kv_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::7] = -1
    slots = slots.to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(DEVICE)
    expected = cache.clone()
    store_kv_reference(key, value, expected[0], expected[1], slots)
    store_kv(key, value, cache[0], cache[1], slots)
    assert torch.equal(cache, expected)


PREFILL_HEADS = [(32, 8, 128), (16, 16, 64), (28, 4, 128), (16, 2, 80), (12, 2, 96)]  # ratios 4, 1, 7, 8, 6


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", PREFILL_HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_prefill(dtype, heads, kv_heads, head_dim, block_size) -> None:
    from kernels.paged_prefill import build_paged_prefill_metadata, paged_prefill

    spans = [(_n(300), _n(700)), (1, _n(2200)), (_n(513), _n(513)), (1, 1), (_n(77), _n(2000) + 5), (1, _n(129))]
    sc = _to(make_prefill_scenario(heads + head_dim, spans, heads, kv_heads, head_dim, block_size, dtype), DEVICE)
    meta = build_paged_prefill_metadata(sc.query_lens, sc.context_lens, sc.block_tables, block_size, DEVICE,
                                        heads, kv_heads)
    _assert_close(paged_prefill(sc.q, sc.k_cache, sc.v_cache, meta, sc.scale), _expected(sc), dtype)


DECODE_CASES = {
    # name: (groups [(prefix, [suffix per member])], ungrouped context lengths)
    "paper": ([(2000, [200] * 32), (2000, [200] * 32)], []),
    "degree128": ([(2000, [(i * 37) % 211 for i in range(128)])], [2200]),
    "mixed": ([(1007, [5, 0, 300, 17] * 16), (33, [1, 0]), (700, [9])], [1, 40, 2500]),
    "groups_of_one": ([(500, [20]), (64, [0]), (129, [3])], [17, 600]),
}


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (32, 32, 128), (16, 2, 80), (14, 2, 64)])
def test_shared_prefix_decode(dtype, case, heads, kv_heads, head_dim) -> None:
    from kernels.shared_prefix_decode import build_shared_prefix_batch, plan_shared_prefix_decode, shared_prefix_decode

    groups, plain = DECODE_CASES[case]
    groups = [(_n(p), [_n(s) if s else 0 for s in sufs[: max(1, len(sufs) // SHRINK)]]) for p, sufs in groups]
    plain = [_n(c) for c in plain]
    sc = _to(make_decode_scenario(len(case) + heads, groups, plain, heads, kv_heads, head_dim, 16, dtype), DEVICE)
    want = _expected(sc)
    rows = torch.tensor(sc.query_rows)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, 16, DEVICE)
    for plan_kw, fused in [({}, True), ({}, False), ({"block_m": 64, "kv_split": 256}, True), ({"block_m": 128}, True)]:
        plan = plan_shared_prefix_decode(batch, heads, kv_heads, **plan_kw)
        out = shared_prefix_decode(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, fused=fused)
        _assert_close(out[rows.to(DEVICE)], want[rows], dtype)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 1, 17, 333])  # sliding windows: one token, under a block, in between
def test_backend_step(dtype: torch.dtype, window: int | None) -> None:
    """A mixed step (group decode rows, plain decode rows, prefill chunks) through the Triton backend;
    with a window, the group members' prefix tiles mask each member by its own position."""
    from kernels.attention_backend import select_backend

    heads, kv_heads = 32, 8
    sc = _to(make_decode_scenario(3, [(_n(900), [_n(40), 0, 1] * 4)], [_n(300), _n(1200), 9], heads, kv_heads,
                                  128, 16, dtype), DEVICE)
    # ungrouped rows become prefill chunks of their last tokens; q rows follow chunk order
    chunks = []
    for i, c in enumerate(sc.context_lens):
        ql = 1 if sc.group_ids[i] is not None or c < 20 else c // 3
        chunks.append((ql, c, sc.block_tables[i], sc.group_ids[i], sc.prefix_lens[i]))
    num_tokens = sum(ch[0] for ch in chunks)
    q = torch.randn(num_tokens, heads, 128, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    backend = select_backend("triton", DEVICE)
    meta = backend.build_step_metadata(
        [c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks], 16, DEVICE,
        num_heads=heads, num_kv_heads=kv_heads, group_ids=[c[3] for c in chunks], prefix_lens=[c[4] for c in chunks],
        window=window,
    )
    out = backend.attention(q, sc.k_cache, sc.v_cache, meta, sc.scale, window=window)
    from kernels.paged_attention import build_paged_batch, paged_attention_reference

    plain = build_paged_batch([c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks], 16,
                              torch.device("cpu"))
    want = paged_attention_reference(q.float().cpu(), sc.k_cache.float().cpu(), sc.v_cache.float().cpu(), plain, sc.scale,
                                     window=window)
    _assert_close(out, want, dtype)
