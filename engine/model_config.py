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
    "MistralForCausalLM": (False, False),
}
# model_type -> architecture, for a config.json without `architectures`
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM"}
# architectures whose `sliding_window` key (null: full attention) applies to every layer
_SLIDING_WINDOW_ARCHITECTURES = ("MistralForCausalLM",)
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
    # keys each layer's queries see, themselves included (a token at position p sees keys at
    # positions > p - window, as transformers); None: full causal attention
    sliding_window: int | None = None

    def layer_window(self, layer_index: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        return self.sliding_window

    @property
    def attention_reach(self) -> int | None:
        """The largest window of any layer (None when some layer attends to its whole context): keys
        further back than this are never read."""
        windows = [self.layer_window(i) for i in range(self.num_layers)]
        return None if not windows or None in windows else max(w for w in windows if w is not None)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in elements (multiply by the element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


class _Fields:
    """Typed reads of config.json values: a wrong type or a missing key is a ModelLoadError naming the
    file and the key (transformers would otherwise fail later, blaming something else)."""

    def __init__(self, raw: dict, path: Path) -> None:
        self.raw = raw
        self.path = path

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}; fix config.json (or download the model again).")

    def whole(self, key: str, default: int | None = None, minimum: int = 1, raw: dict | None = None) -> int:
        value = (self.raw if raw is None else raw).get(key)
        if value is None:
            if default is None:
                raise self.error(f"the required key {key!r} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{key} is {value!r}, not a whole number")
        if value < minimum:
            raise self.error(f"{key} is {value}, it must be at least {minimum}")
        return value

    def number(self, key: str, default: float, raw: dict | None = None) -> float:
        value = (self.raw if raw is None else raw).get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{key} is {value!r}, not a number")
        return float(value)

    def mapping(self, key: str) -> dict:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"{key} is {value!r}, not an object")
        return value


def _rope_config(f: _Fields) -> RopeConfig:
    # transformers 5 keeps theta inside rope_parameters; transformers 4 keeps it top level and the
    # scaling (if any) in rope_scaling, whose type key was once "type".
    params = f.mapping("rope_parameters")
    if params and not any(isinstance(v, dict) for v in params.values()):
        scaling = params
    else:
        scaling = f.mapping("rope_scaling")
    theta = f.number("rope_theta", f.number("rope_theta", 10000.0), raw=scaling)
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"RoPE scaling type '{rope_type}' is not supported; batchllm supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=f.number("factor", 1.0, raw=scaling),
        low_freq_factor=f.number("low_freq_factor", 1.0, raw=scaling),
        high_freq_factor=f.number("high_freq_factor", 4.0, raw=scaling),
        original_max_position_embeddings=f.whole(
            "original_max_position_embeddings", f.whole("max_position_embeddings", 8192), raw=scaling
        ),
    )


def _sliding_window(f: _Fields) -> int | None:
    value = f.raw.get("sliding_window")
    return None if value is None else f.whole("sliding_window")


def _read_json_object(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"Could not read {path}: {exc}.") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix config.json "
            "(or download the model again)."
        ) from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of model settings; fix config.json "
            "(or download the model again)."
        )
    return raw


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; pass --model a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)."
        )
    raw = _read_json_object(path)
    f = _Fields(raw, path)
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    if not architectures and raw.get("model_type") in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[raw["model_type"]]]
    architecture = next((a for a in architectures if isinstance(a, str) and a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise ModelLoadError(
            f"Model architecture {architectures or '(none given)'} in {path} is not supported; "
            f"batchllm supports {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    if raw.get("use_sliding_window") and architecture == "Qwen2ForCausalLM":
        raise ModelLoadError(f"{path} enables Qwen2's sliding-window layers (use_sliding_window), which batchllm "
                             "does not support; batchllm supports sliding windows in Mistral models.")
    qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[architecture]
    hidden = f.whole("hidden_size")
    num_heads = f.whole("num_attention_heads")
    num_kv_heads = f.whole("num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise f.error(f"num_key_value_heads ({num_kv_heads}) does not divide num_attention_heads ({num_heads})")
    if raw.get("head_dim") is None and hidden % num_heads:
        raise f.error(f"num_attention_heads ({num_heads}) does not divide hidden_size ({hidden}) and no head_dim is given")
    return ModelConfig(
        architecture=architecture,
        vocab_size=f.whole("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.whole("intermediate_size"),
        num_layers=f.whole("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=f.whole("head_dim", hidden // num_heads),
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        max_position_embeddings=f.whole("max_position_embeddings", 4096),
        rope=_rope_config(f),
        qkv_bias=qkv_bias or bool(raw.get("attention_bias", False)),
        # Qwen2 has q/k/v bias but never an o_proj bias; Llama and Qwen3 tie both to attention_bias.
        o_bias=bool(raw.get("attention_bias", False)) and not qkv_bias,
        qk_norm=qk_norm,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        sliding_window=_sliding_window(f) if architecture in _SLIDING_WINDOW_ARCHITECTURES else None,
    )
