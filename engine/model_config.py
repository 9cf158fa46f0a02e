"""The architecture of a Hugging Face model directory, read from config.json.

Both key generations are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5 (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError

# architecture name in config.json -> (attention bias on q/k/v, per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str | None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in elements (multiply by the element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _rope_config(raw: dict) -> RopeConfig:
    # transformers 5 keeps theta inside rope_parameters; transformers 4 keeps it top level and the
    # scaling (if any) in rope_scaling, whose type key was once "type".
    params = raw.get("rope_parameters") or {}
    if isinstance(params, dict) and params and not any(isinstance(v, dict) for v in params.values()):
        scaling = params
    else:
        scaling = raw.get("rope_scaling") or {}
    theta = float(scaling.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"RoPE scaling type '{rope_type}' is not supported; batchllm supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; pass --model a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Could not read {path}: {exc}.") from exc
    architectures = raw.get("architectures") or []
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise ModelLoadError(
            f"Model architecture {architectures or '(none given)'} in {path} is not supported; "
            f"batchllm supports {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    if raw.get("use_sliding_window") and architecture == "Qwen2ForCausalLM":
        raise ModelLoadError(f"{path} enables sliding-window attention, which batchllm does not support.")
    qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[architecture]
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope=_rope_config(raw),
        qkv_bias=qkv_bias or bool(raw.get("attention_bias", False)),
        # Qwen2 has q/k/v bias but never an o_proj bias; Llama and Qwen3 tie both to attention_bias.
        o_bias=bool(raw.get("attention_bias", False)) and not qkv_bias,
        qk_norm=qk_norm,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )
