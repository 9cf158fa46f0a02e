"""Linear layers on CPU through oneDNN with packed weights (kernels/cpu_linear.py): the same results as
F.linear, and an engine that runs them by default and gives the same answers as without them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import model_factory
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.packed_linear import PackedLinear
from engine.sampling_params import SamplingParams
from kernels.cpu_linear import pack_linear_weight, packed_linear, packed_linear_problem

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _needs_packing(dtype: torch.dtype) -> None:
    problem = packed_linear_problem(dtype)
    if problem is not None:
        pytest.skip(f"packed linears do not run here: {problem}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inner", "outer"), [(0, 8, 4), (1, 5, 1), (3, 72, 33), (17, 257, 300), (130, 64, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int, inner: int, outer: int, bias: bool) -> None:
    _needs_packing(dtype)
    gen = torch.Generator().manual_seed(rows * 1000 + inner)
    weight = torch.randn(outer, inner, generator=gen).to(dtype)
    b = torch.randn(outer, generator=gen).to(dtype) if bias else None
    # a view with a row stride wider than its width: the engine's activations are often slices
    x = torch.randn(rows, inner + 3, generator=gen).to(dtype)[:, :inner]
    got = packed_linear(x, pack_linear_weight(weight), b)
    want = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (rows, outer)
    scale = want.abs().max().item() if rows else 1.0
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype] * max(scale, 1.0), rtol=TOLERANCE[dtype])


def test_packed_linear_module_keeps_the_layer_shape_and_parameter_count() -> None:
    _needs_packing(torch.float32)
    layer = torch.nn.Linear(48, 20)
    packed = PackedLinear(layer.weight, layer.bias)
    assert (packed.in_features, packed.out_features) == (48, 20)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in layer.parameters())
    for rows in (1, 6):  # one row of a small layer runs on its dense copy
        x = torch.randn(rows, 48)
        torch.testing.assert_close(packed(x), layer(x), atol=1e-5, rtol=1e-5)


def test_float16_has_no_packed_linear() -> None:
    assert packed_linear_problem(torch.float16) == "float16 has no packed CPU linear"


def _run(model_dir: Path, monkeypatch: pytest.MonkeyPatch, switch: str) -> tuple[LLMEngine, list[list[int]]]:
    monkeypatch.setenv("BATCHLLM_NATIVE_KERNELS", switch)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32", kv_cache_tokens=2048))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = model_factory.make_prompts([3, 17, 40, 66], seed=5)
    done = {r.key: list(r.token_ids) for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    return engine, [done[i] for i in range(len(prompts))]


def test_engine_packs_linears_on_cpu_with_the_same_answers(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # granite: tied embeddings (the output projection gets its own packed copy), biases, logit scaling
    _needs_packing(torch.float32)
    model_dir = tiny_model_dir("granite")
    packed, packed_tokens = _run(model_dir, monkeypatch, "1")
    plain, plain_tokens = _run(model_dir, monkeypatch, "0")
    assert packed.model_info.linear_layers == "onednn-packed"
    assert plain.model_info.linear_layers == "torch (turned off by BATCHLLM_NATIVE_KERNELS)"
    assert all(isinstance(m, PackedLinear) for m in (packed.runner.model.lm_head,
                                                     packed.runner.model.model.layers[0].self_attn.qkv_proj))
    # the tied output projection's packed copy is no new parameter
    assert packed.model_info.num_parameters == plain.model_info.num_parameters
    assert packed_tokens == plain_tokens
    hidden = torch.randn(5, packed.model_config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(packed.runner.model.compute_logits(hidden), plain.runner.model.compute_logits(hidden),
                                   atol=1e-4, rtol=1e-4)
