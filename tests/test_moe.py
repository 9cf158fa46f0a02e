"""Qwen3-MoE and Mixtral beyond greedy parity (tests/test_engine_parity.py runs that on qwen3_moe and
mixtral_window): prefill logits equal transformers', the batched expert computation equals a
token-by-token one whichever experts the tokens pick, which layers get experts, and what the config
and weight checks refuse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model_factory
from engine.errors import ModelLoadError
from engine.loader import check_weights
from engine.model_config import MoeOptions, load_model_config
from engine.models.moe import grouped_experts, route
from test_model_families import _engine, _prefill_logits

MOE_VARIANTS = ["qwen3_moe", "mixtral_window"]


def _expert_by_expert(x, weights, experts, gate_up, down):
    inter = down.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            gate, up = (gate_up[e] @ x[t]).split(inter)
            out[t] += weights[t, j] * (down[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_grouped_experts_equal_token_by_token(num_tokens: int, norm_topk_prob: bool) -> None:
    """Few tokens leave experts unpicked (their weights are skipped); many pick experts unevenly."""
    g = torch.Generator().manual_seed(num_tokens)
    hidden, inter, num_experts = 24, 10, 7
    moe = MoeOptions(num_experts, 3, inter, norm_topk_prob)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g)
    down = torch.randn(num_experts, hidden, inter, generator=g)
    weights, experts = route(torch.randn(num_tokens, num_experts, generator=g) * 3, moe, x.dtype)
    sums = weights.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) == norm_topk_prob
    expected = _expert_by_expert(x, weights, experts, gate_up, down)
    torch.testing.assert_close(grouped_experts(x, weights, experts, gate_up, down), expected, atol=1e-4, rtol=1e-4)


def _copy(src: Path, dst: Path, **config_changes: object) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(config_changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_qwen3_moe_dense_layers_follow_sparse_step_and_mlp_only_layers(tiny_model_dir, tmp_path: Path) -> None:
    """transformers' rule: experts where the layer is not in mlp_only_layers and (index + 1) % step == 0."""
    src = tiny_model_dir("qwen3_moe")
    assert load_model_config(src).family.moe.dense_layers == (1,)
    cfg = load_model_config(_copy(src, tmp_path / "step", num_hidden_layers=6, decoder_sparse_step=2,
                                  mlp_only_layers=[3]))
    assert [cfg.layer_has_experts(i) for i in range(6)] == [False, True, False, False, False, True]
    assert load_model_config(_copy(src, tmp_path / "none", num_local_experts=0, num_experts=0)).family.moe is None


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_a_config_without_architectures_is_known_by_its_model_type(variant: str, tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir(variant)
    assert load_model_config(_copy(src, tmp_path / "typed", architectures=None)) == load_model_config(src)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_both_key_styles_read_alike(variant: str, tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir(variant)
    other = "v5" if model_factory.VARIANTS[variant].key_style == "v4" else "v4"
    dst = _copy(src, tmp_path / other)
    model_factory.rewrite_config_keys(dst / "config.json", other)
    assert (dst / "config.json").read_text() != (src / "config.json").read_text()
    assert load_model_config(dst) == load_model_config(src)


def test_qwen3_moe_reads_the_transformers_4_experts_key(tiny_model_dir, tmp_path: Path) -> None:
    """transformers 4 wrote Qwen3-MoE's expert count as num_experts, transformers 5 as num_local_experts."""
    src = tiny_model_dir("qwen3_moe")
    dst = _copy(src, tmp_path / "v4", num_experts=4)
    raw = json.loads((dst / "config.json").read_text())
    del raw["num_local_experts"]
    (dst / "config.json").write_text(json.dumps(raw))
    assert load_model_config(dst) == load_model_config(src)


def test_moe_configs_that_cannot_run_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("qwen3_moe")
    with pytest.raises(ModelLoadError, match="num_experts_per_tok \\(5\\) exceeds the 4 experts"):
        load_model_config(_copy(src, tmp_path / "topk", num_experts_per_tok=5))
    with pytest.raises(ModelLoadError, match="use_sliding_window"):
        load_model_config(_copy(src, tmp_path / "window", use_sliding_window=True, sliding_window=16))


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_expert_weights_that_do_not_fit_the_config_are_refused(variant: str, tiny_model_dir, tmp_path: Path) -> None:
    """From the safetensors headers alone, naming the expert tensor."""
    src = tiny_model_dir(variant)
    check_weights(src, load_model_config(src))
    size_key = "moe_intermediate_size" if variant == "qwen3_moe" else "intermediate_size"
    narrow = _copy(src, tmp_path / "narrow", **{size_key: 40})
    with pytest.raises(ModelLoadError, match=r"experts\.0\..* has shape \((48, 64|64, 48)\) but the config implies"):
        check_weights(narrow, load_model_config(narrow))
    fewer = _copy(src, tmp_path / "fewer", num_local_experts=3)
    # the router's rows or the fourth expert's tensors, whichever the files list first
    with pytest.raises(ModelLoadError, match=r"the config has 3 experts|gate\.weight.* implies \(3, 64\)"):
        check_weights(fewer, load_model_config(fewer))
    more = _copy(src, tmp_path / "more", num_local_experts=5, num_experts=5)
    with pytest.raises(ModelLoadError, match=r"gate\.weight.* has shape \(4, 64\) but the config implies \(5, 64\)"):
        check_weights(more, load_model_config(more))


def test_a_missing_expert_projection_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    """One expert's up projection missing leaves part of the stacked gate_up tensor unfilled."""
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("qwen3_moe")
    dst = _copy(src, tmp_path / "missing")
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.2.up_proj.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack 1 tensors .*layers\.2\.mlp\.experts\.gate_up_proj"):
        check_weights(dst, load_model_config(dst))


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_fused_kernels_match_unfused(variant: str, tiny_model_dir) -> None:
    """The Triton grouped-GEMM experts (interpreter on CPU) in the model, against the PyTorch experts."""
    engine = _engine(tiny_model_dir(variant))
    prompt = model_factory.make_prompts([40], seed=3)[0]
    unfused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(True)
    assert any(getattr(m, "fused", False) for m in engine.runner.model.modules() if hasattr(m, "experts"))
    fused = _prefill_logits(engine, prompt)
    engine.runner.model.use_fused_kernels(False)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-5)
