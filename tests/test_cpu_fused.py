"""The compiled CPU elementwise steps (kernels/cpu_fused.py) equal the PyTorch ops they replace, and the
engine runs them where the compiled library is built.

Cases: RMSNorm with and without the residual add (rows 0 to 300, widths 1 to 2,048, q/k norms over
[tokens, heads, head_dim]), SiLU(gate) * up, RoPE over q and k side by side in a qkv projection (a
strided view); float32 to float32's summation order, bfloat16 to one rounding step (each intermediate
PyTorch rounds is rounded there too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import model_factory
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.decoder import RMSNorm
from engine.models.rope import apply_rope, apply_rope_fast
from kernels import cpu_library
from kernels.cpu_fused import fused_ops_usable, native_rms_norm, native_rope, native_silu_mul

needs_kernel = pytest.mark.skipif(cpu_library.native_library_problem() is not None,
                                  reason=f"compiled library unavailable: {cpu_library.native_library_problem()}")
TOLERANCE = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _norm(dim: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(dim)))
    return norm.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(0, 8), (1, 1), (5, 7), (300, 256), (3, 2048)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_the_pytorch_ops(dtype: torch.dtype, rows: int, dim: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, dim, generator=gen).to(dtype) if with_residual else None
    norm = _norm(dim, dtype)
    want = norm(x, residual) if with_residual else norm(x)
    got = native_rms_norm(x, norm.weight.detach(), norm.eps, residual)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # the sum: one rounding, the same
        torch.testing.assert_close(got[0], want[0], **TOLERANCE[dtype])
    else:
        assert got[1] is None
        torch.testing.assert_close(got[0], want, **TOLERANCE[dtype])


@needs_kernel
def test_the_module_runs_the_kernel_for_per_head_norms() -> None:
    norm = _norm(16, torch.float32)
    x = torch.randn(9, 4, 16)  # q norm per head: [tokens, heads, head_dim]
    want = norm(x)
    norm.cpu_fused = True
    with torch.inference_mode():
        got = norm(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(0, 4), (1, 3), (17, 640), (200, 1000)])
def test_silu_mul_equals_the_pytorch_ops(dtype: torch.dtype, rows: int, inter: int) -> None:
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).to(dtype)
    gate, up = gate_up.split(inter, dim=-1)
    torch.testing.assert_close(native_silu_mul(gate_up), F.silu(gate) * up, **TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 64), (2, 2, 16), (8, 1, 6)])
def test_rope_equals_apply_rope_fast_on_the_qkv_view(heads: int, kv_heads: int, dim: int) -> None:
    tokens, positions = 13, torch.tensor([0, 1, 2, 5, 9, 40, 41, 100, 3, 7, 8, 60, 127])
    gen = torch.Generator().manual_seed(dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    angles = torch.arange(128)[:, None] * torch.rand(dim // 2, generator=gen)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    table = torch.stack((emb.cos(), emb.sin()), dim=1).contiguous()  # [128, 2, dim]
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    cos_sin = table[positions]
    want = apply_rope_fast(qk, cos_sin[:, 0:1], cos_sin[:, 1:2])
    torch.testing.assert_close(native_rope(qk, positions, table), want, **TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("dim", "rot"), [(64, 64), (32, 24), (16, 2)])
def test_rope_equals_apply_rope_with_partial_rotary(dtype: torch.dtype, dim: int, rot: int) -> None:
    """The per-tensor path (q/k norms, partial rotary, 16-bit types): bfloat16 bit for bit, since each
    product and the sum are rounded where apply_rope rounds them."""
    tokens, positions = 11, torch.tensor([0, 3, 4, 9, 17, 30, 31, 2, 60, 61, 62])
    gen = torch.Generator().manual_seed(dim + rot)
    x = (torch.randn(tokens, 4, dim, generator=gen) * 3).to(dtype)
    angles = torch.arange(64)[:, None] * torch.rand(rot // 2, generator=gen)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    table = torch.stack((emb.cos(), emb.sin()), dim=1).contiguous()  # [64, 2, rot]
    cos_sin = table[positions].to(dtype)
    want = apply_rope(x, cos_sin[:, 0:1], cos_sin[:, 1:2])
    got = native_rope(x, positions, table)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_unsupported_tensors_keep_the_pytorch_ops() -> None:
    assert not fused_ops_usable(torch.zeros(2, 2, dtype=torch.float16))
    assert not fused_ops_usable(torch.zeros(2, 2, requires_grad=True))


@needs_kernel
def test_the_engine_runs_them_with_the_pytorch_ops_logits(tiny_model_dir: Callable[[str], Path]) -> None:
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", dtype="float32",
                                    kv_cache_tokens=1024))
    model = engine.runner.model
    assert engine.model_info.decode_attention == "compiled"
    layer = model.model.layers[0]
    assert layer.input_layernorm.cpu_fused and layer.mlp.cpu_fused and layer.self_attn.cpu_fused
    from test_model_families import _prefill_logits

    prompt = model_factory.make_prompts([40], seed=3)[0]
    fused = _prefill_logits(engine, prompt)
    model.use_cpu_fused_ops(False)
    torch.testing.assert_close(fused, _prefill_logits(engine, prompt), atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_equals_the_reference(dtype: torch.dtype) -> None:
    """Keys from a strided qkv view and contiguous values land in the same slots as store_kv_reference
    puts them; slot -1 writes nothing; a slot past the cache is refused, not written."""
    from kernels.paged_attention import store_kv_reference
    from kernels.cpu_fused import native_store_kv, native_store_kv_usable

    gen = torch.Generator().manual_seed(3)
    tokens, kv_heads, head_dim, blocks, block_size = 37, 2, 12, 9, 8
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    key = qkv[:, 4 * head_dim: (4 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[5] = -1
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    got = [c.clone() for c in caches]
    store_kv_reference(key, value, *want, slots)
    assert native_store_kv_usable(key, value, got[0], slots)
    native_store_kv(key, value, *got, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(-1, kv_heads, head_dim)[slots[6]], key[6])
    bad = slots.clone()
    bad[0] = blocks * block_size
    with pytest.raises(IndexError, match="outside the KV cache"):
        native_store_kv(key, value, *got, bad)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 261, 8193])
def test_greedy_tokens_equal_torch_max_with_ties_nans_and_infinities(vocab: int) -> None:
    from engine.sampler import NAN_SCORES, greedy_tokens
    from kernels.cpu_fused import native_greedy_tokens_usable

    g = torch.Generator().manual_seed(vocab)
    wide = torch.randn(9, vocab + 3, generator=g)
    logits = wide[:, 1 : vocab + 1]  # rows not contiguous with each other
    logits[1] = torch.round(logits[1])  # many ties: the first maximal index wins
    logits[2, :] = 0.5  # all equal
    logits[3, vocab // 2] = float("inf")
    logits[4, :] = float("-inf")  # every token masked: index 0, as torch.max
    logits[5, vocab - 1] = float("nan")
    logits[6, 0] = float("nan")
    logits[7, vocab // 3] = float("-inf")
    assert native_greedy_tokens_usable(logits)
    best = logits.max(dim=-1)
    expected = torch.where(torch.isnan(best.values), NAN_SCORES, best.indices)
    assert torch.equal(greedy_tokens(logits), expected)
    assert greedy_tokens(logits)[5] == NAN_SCORES and greedy_tokens(logits)[6] == NAN_SCORES
