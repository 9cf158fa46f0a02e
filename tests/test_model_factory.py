"""The tiny test models are what they claim to be: both config key styles, sharding, tokenizer
files in both chat-template locations, and weights that are not HF's zero/one defaults."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import model_factory
from model_factory import VARIANTS


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_key_style(name: str, tiny_model_dir) -> None:
    raw = json.loads((tiny_model_dir(name) / "config.json").read_text())
    if VARIANTS[name].key_style == "v5":
        assert "rope_parameters" in raw and "dtype" in raw
        assert not {"rope_theta", "rope_scaling", "torch_dtype"} & set(raw)
    else:
        assert "rope_theta" in raw and "torch_dtype" in raw and "rope_scaling" in raw
        assert not {"rope_parameters", "dtype"} & set(raw)


@pytest.mark.parametrize("name", ["llama3_rope_v4", "llama3_rope_v5"])
def test_hf_reads_llama3_rope_from_both_styles(name: str, hf_model) -> None:
    rope = hf_model(name).config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 32 and rope["rope_theta"] == 500000.0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_weights_files_and_values(name: str, tiny_model_dir) -> None:
    model_dir = tiny_model_dir(name)
    sharded = (model_dir / "model.safetensors.index.json").is_file()
    assert sharded == VARIANTS[name].sharded
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) > 1 if sharded else [f.name for f in files] == ["model.safetensors"]
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    tied = json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in tensors) != tied
    norms = [t for k, t in tensors.items() if "norm" in k]
    biases = [t for k, t in tensors.items() if k.endswith(".bias")]
    assert norms and all((t != 1).all() and (t != 0).all() for t in norms)
    assert all(t.abs().min() > 0 for t in biases)
    config = VARIANTS[name].config
    assert bool(biases) == (VARIANTS[name].family == "qwen2" or bool(config.get("attention_bias")))
    if VARIANTS[name].family in ("qwen3", "olmo2"):
        assert "model.layers.0.self_attn.q_norm.weight" in tensors
    if VARIANTS[name].family == "olmo2":  # post-norm layer: no input norm
        assert "model.layers.0.post_feedforward_layernorm.weight" in tensors
        assert "model.layers.0.input_layernorm.weight" not in tensors
    if VARIANTS[name].family == "phi3":  # fused in the checkpoint already
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(tensors)


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mha", "qwen2"])
def test_tokenizer_files(name: str, tiny_model_dir) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    model_dir = tiny_model_dir(name)
    assert (model_dir / "chat_template.jinja").is_file() == VARIANTS[name].chat_template_file
    raw = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "The old engine repaired three apples (or so they said)."
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert hf(text)["input_ids"] == raw.encode(text).ids
    assert hf.decode(raw.encode(text).ids, skip_special_tokens=True) == text
    ours = Tokenizer(model_dir)
    assert ours.vocab_size == model_factory.tokenizer_size()
    assert ours.encode(text) == raw.encode(text).ids
    prompt = ours.apply_chat_template("hi")
    assert prompt == "<|begin_of_text|><|user|>\nhi<|eot|><|assistant|>\n"
