"""Phi-3, Granite and OLMo 2 beyond greedy parity (tests/test_engine_parity.py runs that for every
variant): prefill logits equal transformers' (Granite's logits_scaling never changes a greedy
choice), LongRoPE's factor sets, both config key generations read alike, the fused kernels on
partial rotary and the post-norm layer, and what is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import model_factory
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.llm_engine import LLMEngine
from engine.model_config import load_model_config
from engine.models.rope import rope_cache
from engine.sampling_params import SamplingParams
from engine.step_context import StepContext
from kernels.attention_backend import TorchBackend

FAMILIES = ["phi3", "granite", "olmo2"]
# every family beyond Llama/Qwen whose logits are compared with transformers' (greedy parity can miss
# what never changes the top token: logit scaling, final soft-capping)
LOGIT_VARIANTS = [*FAMILIES, "gemma2", "gemma3", "gemma3_v4", "qwen3_moe", "mixtral_window"]


def _engine(model_dir: Path, **overrides: object) -> LLMEngine:
    settings = {"device": "cpu", "dtype": "float32", "block_size": 16, "max_batch_tokens": 256,
                "kv_cache_tokens": 2048, **overrides}
    return LLMEngine(EngineConfig(model_dir=str(model_dir), **settings))  # type: ignore[arg-type]


def _prefill_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] logits of one prefill forward through the engine's model."""
    model, cfg, runner = engine.runner.model, engine.runner.model_cfg, engine.runner
    n, bs = len(prompt), runner.block_size
    backend = TorchBackend()
    meta = backend.build_step_metadata([n], [n], [list(range(-(-n // bs)))], bs, "cpu",
                                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    ctx = StepContext(backend, runner.kv_caches, torch.arange(n), meta)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(n), ctx))


@pytest.mark.parametrize("variant", LOGIT_VARIANTS)
def test_prefill_logits_equal_transformers(variant: str, tiny_model_dir, hf_model) -> None:
    prompt = model_factory.make_prompts([40], seed=3)[0]
    engine = _engine(tiny_model_dir(variant), max_model_len=model_factory.VARIANTS[variant].max_model_len)
    ours = _prefill_logits(engine, prompt)
    with torch.no_grad():
        theirs = hf_model(variant)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Phi-3 LongRoPE

def test_longrope_tables_equal_transformers_cos_sin(hf_model, tiny_model_dir) -> None:
    """The engine's cos/sin table is transformers' for a sequence of the table's length: the short
    factors up to the original context (512), the long ones beyond it, times the attention factor,
    over the partial rotary dims."""
    cfg = load_model_config(tiny_model_dir("phi3"))
    rotary = hf_model("phi3").model.rotary_emb
    assert cfg.rotary_dim == 12 and cfg.rope.attention_factor > 1.0
    for length in (512, 600):
        positions = torch.arange(length)[None, :]
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        table = rope_cache(cfg.rope, cfg.rotary_dim, length)
        torch.testing.assert_close(table[:, 0], cos[0])
        torch.testing.assert_close(table[:, 1], sin[0])
    short, long = rope_cache(cfg.rope, cfg.rotary_dim, 512), rope_cache(cfg.rope, cfg.rotary_dim, 513)
    assert not torch.allclose(short[100], long[100])


def test_longrope_long_factors_when_the_context_exceeds_the_original(tiny_model_dir, hf_model) -> None:
    """Without max_model_len the engine's context is max_position_embeddings (1024), beyond the
    original 512: it uses the long factors, as transformers does for sequences longer than 512."""
    prompts = model_factory.make_prompts([513, 600, 700], seed=13)
    refs = model_factory.hf_greedy(hf_model("phi3"), prompts, 8)
    engine = _engine(tiny_model_dir("phi3"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {r.key: r for r in engine.generate(iter([(i, p, params) for i, p in enumerate(prompts)]))}
    assert [list(results[i].token_ids) for i in range(3)] == [r.tokens for r in refs]


# ---------------------------------------------------------------- config reading

def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst / "config.json"


@pytest.mark.parametrize("variant", FAMILIES)
def test_both_key_styles_read_alike(variant: str, tiny_model_dir, tmp_path: Path) -> None:
    """transformers 4 keys (rope_theta, rope_scaling, top-level partial_rotary_factor, torch_dtype)
    and transformers 5 keys (rope_parameters, dtype) give one ModelConfig, and one to transformers."""
    from transformers import AutoConfig

    src = tiny_model_dir(variant)
    other = "v5" if model_factory.VARIANTS[variant].key_style == "v4" else "v4"
    config_path = _copy_config(src, tmp_path / other)
    model_factory.rewrite_config_keys(config_path, other)
    assert config_path.read_text() != (src / "config.json").read_text()
    assert load_model_config(tmp_path / other) == load_model_config(src)
    assert AutoConfig.from_pretrained(tmp_path / other).rope_parameters == AutoConfig.from_pretrained(src).rope_parameters


def _edited(src: Path, dst: Path, **changes: object) -> Path:
    path = _copy_config(src, dst)
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return dst


def test_phi3_old_rope_type_names_mean_longrope(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("phi3")
    scaling = json.loads((src / "config.json").read_text())["rope_scaling"]
    for old in ("su", "yarn"):
        renamed = {k: v for k, v in scaling.items() if k != "rope_type"} | {"type": old}
        assert load_model_config(_edited(src, tmp_path / old, rope_scaling=renamed)) == load_model_config(src)


def test_phi3_reads_its_sliding_window(tiny_model_dir, tmp_path: Path) -> None:
    """Phi-3 masks attention with `sliding_window` as Mistral does (phi3_window's parity cases check the
    outputs); null is full attention."""
    src = tiny_model_dir("phi3")
    assert load_model_config(_edited(src, tmp_path / "window", sliding_window=256)).sliding_window == 256
    assert load_model_config(src).sliding_window is None


def test_other_mlp_activations_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="hidden_act 'gelu'"):
        load_model_config(_edited(tiny_model_dir("granite"), tmp_path / "gelu", hidden_act="gelu"))


def test_longrope_factor_count_must_match_the_rotary_dims(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("phi3")
    scaling = json.loads((src / "config.json").read_text())["rope_scaling"]
    bad = _edited(src, tmp_path / "bad", rope_scaling={**scaling, "long_factor": [1.0] * 8})
    with pytest.raises(ModelLoadError, match="long_factor has 8 numbers; the rotary dims need 6"):
        load_model_config(bad)


# ---------------------------------------------------------------- fused kernels (Triton interpreter on CPU)

@pytest.mark.parametrize("variant", ["phi3", "olmo2"])
def test_fused_kernels_match_unfused(variant: str, tiny_model_dir) -> None:
    """RoPE in place on the rotated dims only (partial rotary) and the post-norm layer's plain norms."""
    engine = _engine(tiny_model_dir(variant), max_model_len=model_factory.VARIANTS[variant].max_model_len)
    prompt = model_factory.make_prompts([40], seed=3)[0]
    unfused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(True)
    fused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(False)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-5)
