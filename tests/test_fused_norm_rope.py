"""Fused add+RMSNorm and RoPE Triton kernels (interpreter on CPU) against their PyTorch references
and the decoder's unfused ops; and the decoder with `use_fused_kernels(True)` against itself unfused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model_factory
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_config import RopeConfig
from engine.models.decoder import RMSNorm
from engine.models.rope import apply_rope, rope_cache
from engine.sampling_params import SamplingParams
from engine.step_context import StepContext
from kernels import rms_norm as norm_kernels
from kernels import rotary as rotary_kernels
from kernels.attention_backend import TorchBackend
from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference
from kernels.rotary import rotary_embedding, rotary_embedding_reference

DTYPES = [torch.float32, torch.float16]
# kernel vs its own reference (same math, other summation order / no FMA)
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# fused RoPE vs apply_rope, which rounds cos/sin and each product to 16 bits
UNFUSED_TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
EPS = 1e-5


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
# scale 1e-3: mean(x^2) ~ 1e-5 ~ eps, so a wrong eps shows
@pytest.mark.parametrize("rows,hidden,scale", [(3, 64, 3.0), (3, 80, 3.0), (70, 96, 1e-3), (3, 5120, 3.0)])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, rows: int, hidden: int, scale: float) -> None:
    g = torch.Generator().manual_seed(hidden + rows)
    # x as a column slice of a wider buffer: rows need not be contiguous with each other
    x = (torch.randn(rows, hidden + 16, generator=g) * scale).to(dtype)[:, :hidden]
    residual = (torch.randn(rows, hidden, generator=g) * scale).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()

    normed, new_residual = fused_add_rms_norm(x, residual, weight, EPS)
    ref_normed, ref_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert torch.equal(new_residual, ref_residual)  # one rounding of the same sum
    _close(normed, ref_normed, KERNEL_TOL[dtype])
    assert normed.is_contiguous() and new_residual.is_contiguous()
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched

    _close(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS), KERNEL_TOL[dtype])
    # the decoder module's own torch path is the reference, verbatim
    module = RMSNorm(hidden, EPS).to(dtype)
    module.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(module(x), rms_norm_reference(x, weight, EPS))
        torch_normed, torch_residual = module(x, residual)
        module.fused = True
        fused_normed, fused_residual = module(x, residual)
    assert torch.equal(torch_residual, fused_residual)
    _close(fused_normed, torch_normed, KERNEL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (4, 80), (8, 128)])
def test_rms_norm_per_head_on_qkv_view(dtype: torch.dtype, heads: int, head_dim: int) -> None:
    """The Qwen3 q/k norm: [tokens, heads, head_dim] rows read through a strided view of qkv."""
    g = torch.Generator().manual_seed(heads * head_dim)
    tokens = 5
    qkv = (torch.randn(tokens, (heads + 2) * head_dim, generator=g) * 2).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    assert not q.is_contiguous() and heads > 0
    weight = (torch.rand(head_dim, generator=g) + 0.5).to(dtype)
    got = rms_norm(q, weight, EPS)
    assert got.shape == q.shape and got.is_contiguous()
    _close(got, rms_norm_reference(q, weight, EPS), KERNEL_TOL[dtype])


def test_rms_norm_rejects_bad_inputs() -> None:
    x = torch.randn(4, 32)
    w = torch.ones(32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(16), EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(4, 16), w, EPS)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm(torch.randn(32, 4).t(), w, EPS)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm(torch.randn(2, 2, 2, 32), w, EPS)
    empty, empty_residual = fused_add_rms_norm(x[:0], x[:0], w, EPS)  # no rows: no launch
    assert empty.shape == (0, 32) and empty_residual.shape == (0, 32)


# ---------------------------------------------------------------- RoPE

MAX_POSITIONS = 300


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (8, 2), (4, 4), (8, 8)])
def test_rotary_matches_reference_in_place_on_qkv(dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(head_dim * 100 + heads * 10 + kv_heads)
    rope = RopeConfig(rope_type="default", theta=10000.0)
    table = rope_cache(rope, head_dim, MAX_POSITIONS)
    tokens = 37
    positions = torch.randperm(MAX_POSITIONS, generator=g)[:tokens]  # not sorted, reaches far rows
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    before = qkv.clone()
    ref_q, ref_k = rotary_embedding_reference(q, k, positions, table)
    cos_sin = table[positions].to(dtype)
    unfused_q = apply_rope(q, cos_sin[:, 0:1], cos_sin[:, 1:2])
    unfused_k = apply_rope(k, cos_sin[:, 0:1], cos_sin[:, 1:2])

    out_q, out_k = rotary_embedding(q, k, positions, table)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    _close(q, ref_q, KERNEL_TOL[dtype])
    _close(k, ref_k, KERNEL_TOL[dtype])
    _close(q, unfused_q, UNFUSED_TOL[dtype])
    _close(k, unfused_k, UNFUSED_TOL[dtype])
    assert torch.equal(v, before[:, q_size + kv_size:])  # v is not touched
    assert not torch.equal(qkv[:, :q_size], before[:, :q_size])  # and q was


def test_rotary_reference_is_apply_rope_in_float32() -> None:
    """With a llama3-scaled table too: in float32 the reference is apply_rope up to rounding."""
    rope = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=32)
    table = rope_cache(rope, 32, 64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 4, 32, generator=g), torch.randn(6, 2, 32, generator=g)
    positions = torch.tensor([5, 63, 0, 17, 40, 2], dtype=torch.int32)
    cos_sin = table[positions.long()]
    ref_q, ref_k = rotary_embedding_reference(q, k, positions, table)
    _close(ref_q, apply_rope(q, cos_sin[:, 0:1], cos_sin[:, 1:2]), 1e-6)
    _close(ref_k, apply_rope(k, cos_sin[:, 0:1], cos_sin[:, 1:2]), 1e-6)
    rotary_embedding(q, k, positions, table)  # int32 positions
    _close(q, ref_q, 1e-6)
    _close(k, ref_k, 1e-6)


def test_rotary_rejects_bad_inputs() -> None:
    table = rope_cache(RopeConfig(rope_type="default", theta=10000.0), 16, 8)
    q, k, pos = torch.zeros(3, 4, 16), torch.zeros(3, 2, 16), torch.arange(3)
    with pytest.raises(ValueError, match="cos_sin"):
        rotary_embedding(q, k, pos, table.half())
    with pytest.raises(ValueError, match="odd"):
        rotary_embedding(q[..., :15], k[..., :15], pos, table[..., :15].contiguous())
    with pytest.raises(ValueError, match="k must be"):
        rotary_embedding(q, torch.zeros(3, 2, 8), pos, table)
    with pytest.raises(ValueError, match="q must be"):
        rotary_embedding(q[:2], k, pos, table)
    with pytest.raises(ValueError, match="both must be"):
        rotary_embedding(q, k.half(), pos, table)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(q, k, pos.float(), table)
    rotary_embedding(q[:0], k[:0], pos[:0], table)  # no tokens: no launch


# ---------------------------------------------------------------- the decoder, fused vs not

def _engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32", block_size=16,
                                  max_batch_tokens=64, kv_cache_tokens=1024))


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen3"])
def test_fused_decoder_logits_match_unfused(variant: str, tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """One prefill forward: fused logits within float32 rounding of the torch path's, and switching
    the kernels off again gives the torch path's logits bit for bit."""
    engine = _engine(tiny_model_dir(variant))
    model, cfg, runner = engine.runner.model, engine.runner.model_cfg, engine.runner
    prompt = model_factory.make_prompts([40], seed=3)[0]
    n, bs = len(prompt), runner.block_size
    backend = TorchBackend()
    meta = backend.build_step_metadata([n], [n], [list(range(-(-n // bs)))], bs, "cpu",
                                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    ctx = StepContext(backend, runner.kv_caches, torch.arange(n), meta)
    ids, positions = torch.tensor(prompt), torch.arange(n)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.compute_logits(model(ids, positions, ctx))

    unfused = logits()
    norm_calls = _count_calls(monkeypatch, norm_kernels, "fused_add_rms_norm")
    rope_calls = _count_calls(monkeypatch, rotary_kernels, "rotary_embedding")
    model.use_fused_kernels(True)
    fused = logits()
    # add+norms: 2 per layer, less the first input norm (no residual yet), plus the final norm
    assert len(norm_calls) == 2 * cfg.num_layers and len(rope_calls) == cfg.num_layers
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-5)
    model.use_fused_kernels(False)
    assert torch.equal(logits(), unfused)


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen3"])
def test_fused_decoder_generates_same_tokens(variant: str, tiny_model_dir) -> None:
    """Greedy generation (chunked prefill + decode, float32) is token-identical with the kernels on."""
    prompts = model_factory.make_prompts([3, 17, 70], seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = []
    for fused in (False, True):
        engine = _engine(tiny_model_dir(variant))
        engine.runner.model.use_fused_kernels(fused)
        results = {r.key: r for r in engine.generate(iter([(i, p, params) for i, p in enumerate(prompts)]))}
        assert not any(r.error for r in results.values())
        outputs.append([list(results[i].token_ids) for i in range(len(prompts))])
    assert all(len(tokens) == 8 for tokens in outputs[0])
    assert outputs[1] == outputs[0]


def test_fused_kernels_need_cuda_or_interpreter(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _engine(tiny_model_dir("llama_gqa")).runner.model
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        model.use_fused_kernels(True)
    assert not model.fused_kernels
    model.use_fused_kernels(False)  # switching off never needs Triton
