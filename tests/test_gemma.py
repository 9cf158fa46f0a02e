"""Gemma 2 and Gemma 3 (text) beyond greedy parity (tests/test_engine_parity.py runs that): prefill
logits equal transformers' (the final logit soft-cap never changes a greedy choice), which layers
slide and which RoPE each layer uses, both config key generations of Gemma 3, the fused kernels, and
the Triton backend, and what is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import model_factory
from engine.errors import ModelLoadError
from engine.model_config import load_model_config
from engine.sampling_params import SamplingParams
from test_model_families import _engine, _prefill_logits


def _edited(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes: object) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    raw = json.loads((dst / "config.json").read_text())
    for key in drop:
        raw.pop(key, None)
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_layer_windows_and_ropes(tiny_model_dir, tmp_path: Path) -> None:
    """layer_types decides which layers slide; without it transformers' default pattern does (every
    second layer full for Gemma 2, every sixth for Gemma 3); Gemma 3's sliding layers use the local RoPE."""
    g2 = load_model_config(tiny_model_dir("gemma2"))
    assert [g2.layer_window(i) for i in range(2)] == [13, None] and g2.attention_reach is None
    assert g2.layer_rope(0) == g2.layer_rope(1) == g2.rope and g2.local_rope is None
    g3 = load_model_config(tiny_model_dir("gemma3"))
    assert [g3.layer_window(i) for i in range(3)] == [13, None, 13]
    assert (g3.layer_rope(0).theta, g3.layer_rope(0).rope_type) == (1e4, "default")
    assert (g3.layer_rope(1).theta, g3.layer_rope(1).rope_type, g3.layer_rope(1).factor) == (1e6, "linear", 4.0)
    seven = _edited(tiny_model_dir("gemma3"), tmp_path / "g3", drop=("layer_types",), num_hidden_layers=7)
    assert [load_model_config(seven).layer_window(i) is None for i in range(7)] == [False] * 5 + [True, False]
    four = _edited(tiny_model_dir("gemma2"), tmp_path / "g2", drop=("layer_types",), num_hidden_layers=4)
    assert [load_model_config(four).layer_window(i) for i in range(4)] == [13, None, 13, None]


def test_gemma3_key_styles_read_alike(tiny_model_dir, tmp_path: Path) -> None:
    """transformers 4 keys (rope_theta, rope_scaling, rope_local_base_freq, sliding_window_pattern) and
    transformers 5 keys (rope_parameters per layer type, layer_types) give one ModelConfig."""
    src = tiny_model_dir("gemma3_v4")
    v5 = _edited(src, tmp_path / "v5", drop=("rope_theta", "rope_scaling", "rope_local_base_freq", "torch_dtype",
                                             "sliding_window_pattern"),
                 dtype="float32", layer_types=["sliding_attention", "full_attention"],
                 rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    assert load_model_config(v5) == load_model_config(src)
    from transformers import AutoConfig

    ours, theirs = AutoConfig.from_pretrained(v5), AutoConfig.from_pretrained(src)
    assert (ours.rope_parameters, ours.layer_types) == (theirs.rope_parameters, theirs.layer_types)


def test_refusals(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("gemma2")
    with pytest.raises(ModelLoadError, match="hidden_activation 'gelu'"):
        load_model_config(_edited(src, tmp_path / "gelu", hidden_activation="gelu"))
    with pytest.raises(ModelLoadError, match="layer_types must list"):
        load_model_config(_edited(src, tmp_path / "types", layer_types=["sliding_attention"]))
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        load_model_config(_edited(src, tmp_path / "bidi", use_bidirectional_attention=True))


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_triton_backend_greedy_equals_transformers(variant: str, tiny_model_dir, hf_model) -> None:
    """The Triton kernels (interpreter on CPU) soft-cap (Gemma 2) and the fused RoPE reads the sliding
    layers' own table (Gemma 3): prompts past the window, two sharing a prefix (the shared decode path)."""
    base = model_factory.make_prompts([30, 24], seed=11)
    prompts = [base[0], base[0] + base[1][1:9], base[0] + base[1][9:20], base[1]]
    refs = model_factory.hf_greedy(hf_model(variant), prompts, 6)
    engine = _engine(tiny_model_dir(variant), attention_backend="triton", prefix_sharing="plan")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {r.key: list(r.token_ids) for r in engine.generate(iter((i, p, params) for i, p in enumerate(prompts)))}
    assert [results[i] for i in range(len(prompts))] == [r.tokens for r in refs]


def test_fused_kernels_match_unfused(tiny_model_dir) -> None:
    """Fused RoPE reads the sliding layers' own table; the (1 + weight) norms stay in PyTorch."""
    engine = _engine(tiny_model_dir("gemma3"))
    prompt = model_factory.make_prompts([40], seed=3)[0]
    unfused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(True)
    fused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(False)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-5)
