"""The architecture of a Hugging Face model directory, read from config.json.

Both key generations are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5 (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.config_fields import ConfigFields, read_json_object
from engine.errors import ModelLoadError

QkNorm = Literal["none", "per_head", "whole"]


@dataclass(frozen=True)
class Architecture:
    """What a family's config.json does not say about its layer (the defaults: Llama)."""

    qkv_bias: bool = False  # q/k/v biased whatever attention_bias says (Qwen2)
    qk_norm: QkNorm = "none"  # RMSNorm of q and k: per head (Qwen3) or over the whole projection (OLMo 2)
    post_norm: bool = False  # OLMo 2's layer, see FamilyOptions.post_norm
    partial_rotary: bool = False  # reads partial_rotary_factor (transformers ignores it for the others)
    multipliers: bool = False  # reads Granite's embedding/residual/attention multipliers and logits_scaling
    rope_type_aliases: tuple[tuple[str, str], ...] = ()  # old rope type names transformers renames
    default_original_max_positions: int | None = None  # the config class's original_max_position_embeddings
    sliding_window: bool = False  # its `sliding_window` key (null: full attention) applies to every layer
    # mixture-of-experts MLPs: "qwen3_moe" (moe_intermediate_size, norm_topk_prob, dense layers by
    # decoder_sparse_step and mlp_only_layers) or "mixtral" (experts of intermediate_size, top-k renormalised)
    experts: Literal["none", "qwen3_moe", "mixtral"] = "none"
    # Gemma 2 / 3: `layer_types` names each layer sliding_attention or full_attention (default: every
    # `sliding_pattern`-th layer full, the others sliding); (1 + weight) RMSNorms; norms before and
    # after attention and the MLP; embeddings times sqrt(hidden_size); q.k scaled by
    # query_pre_attn_scalar ** -0.5; tanh soft-capping of attention and final logits; gelu-tanh MLP
    gemma: bool = False
    sliding_pattern: int = 2
    local_rope: bool = False  # Gemma 3: sliding layers use their own RoPE (rope_local_base_freq, unscaled)
    default_softcaps: tuple[float | None, float | None] = (None, None)  # (attention, final) when the keys are absent


SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True),
    "Qwen3ForCausalLM": Architecture(qk_norm="per_head"),
    "MistralForCausalLM": Architecture(sliding_window=True),
    "Phi3ForCausalLM": Architecture(partial_rotary=True, rope_type_aliases=(("su", "longrope"), ("yarn", "longrope")),
                                    default_original_max_positions=4096, sliding_window=True),
    "GraniteForCausalLM": Architecture(multipliers=True),
    "Olmo2ForCausalLM": Architecture(qk_norm="whole", post_norm=True),
    "Qwen3MoeForCausalLM": Architecture(qk_norm="per_head", experts="qwen3_moe"),
    "MixtralForCausalLM": Architecture(sliding_window=True, experts="mixtral"),
    "Gemma2ForCausalLM": Architecture(gemma=True, default_softcaps=(50.0, 30.0)),
    "Gemma3ForCausalLM": Architecture(qk_norm="per_head", gemma=True, sliding_pattern=6, local_rope=True),
}
# model_type -> architecture, for a config.json without `architectures`
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
                "olmo2": "Olmo2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3): per-frequency divisors of the inverse frequencies for a context up to
    # original_max_position_embeddings (short) or beyond it (long); cos and sin are multiplied by
    # attention_factor (given, or transformers' default from the context growth `factor`)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim * this) dims of each head


@dataclass(frozen=True)
class MoeOptions:
    """A sparse mixture-of-experts MLP: a router picks each token's top `experts_per_token` of
    `num_experts` SiLU-gated MLPs (softmax over all experts, then top-k) and sums their outputs
    weighted by the top-k probabilities, renormalised to sum to 1 when `norm_topk_prob`."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    dense_layers: tuple[int, ...] = ()  # layers with an ordinary MLP of intermediate_size instead (Qwen3-MoE)


@dataclass(frozen=True)
class FamilyOptions:
    """The decoder's variations on the Llama layer (the defaults); engine/models/decoder.py reads them."""

    qk_norm: QkNorm = "none"
    # OLMo 2: no norm before attention or the MLP; their outputs are normed before the residual add
    # (post_attention_layernorm, post_feedforward_layernorm)
    post_norm: bool = False
    # Granite: embeddings times embedding_multiplier, attention and MLP outputs times
    # residual_multiplier before the residual add, logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5 (Granite: attention_multiplier)
    moe: MoeOptions | None = None  # None: every layer has a dense MLP
    # Gemma: RMSNorm weights are offsets from one (x * (1 + weight), multiplied in float32); norms
    # before and after both attention and the MLP (input_, post_attention_, pre_feedforward_,
    # post_feedforward_layernorm); embeddings times sqrt(hidden_size) rounded to the model dtype
    gemma_norms: bool = False
    embedding_scale_in_model_dtype: bool = False  # embedding_multiplier is cast to the model dtype first
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
    attention_softcap: float | None = None  # scores = cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)


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
    mlp_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str | None
    family: FamilyOptions = field(default_factory=FamilyOptions)
    # keys each layer's queries see, themselves included (a token at position p sees keys at
    # positions > p - window, as transformers); None: full causal attention
    sliding_window: int | None = None
    # per layer, whether it uses sliding_window (Gemma's layer_types); None: every layer does
    sliding_layers: tuple[bool, ...] | None = None
    local_rope: RopeConfig | None = None  # the sliding layers' RoPE (Gemma 3); None: `rope` for every layer

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def layer_has_experts(self, layer_index: int) -> bool:
        """Whether the layer's MLP is the mixture of experts (else the dense MLP)."""
        moe = self.family.moe
        return moe is not None and layer_index not in moe.dense_layers

    def layer_window(self, layer_index: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.sliding_layers is not None and not self.sliding_layers[layer_index]:
            return None
        return self.sliding_window

    def layer_rope(self, layer_index: int) -> RopeConfig:
        """The RoPE of one layer: the local one on Gemma 3's sliding layers, `rope` elsewhere."""
        if self.local_rope is not None and self.sliding_layers is not None and self.sliding_layers[layer_index]:
            return self.local_rope
        return self.rope

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


def _rope_config(
    f: ConfigFields, arch: Architecture, head_dim: int, max_positions: int, scaling: dict | None = None
) -> RopeConfig:
    # transformers 5 keeps theta inside rope_parameters; transformers 4 keeps it top level and the
    # scaling (if any) in rope_scaling, whose type key was once "type". `scaling`: one layer type's
    # parameters (Gemma 3), theta inside.
    if scaling is None:
        params = f.mapping("rope_parameters")
        flat = params and not any(isinstance(v, dict) for v in params.values())
        scaling = params if flat else f.mapping("rope_scaling")
    theta = f.number("rope_theta", f.number("rope_theta", 10000.0, positive=True), raw=scaling, positive=True)
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    rope_type = dict(arch.rope_type_aliases).get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"RoPE scaling type '{rope_type}' is not supported; batchllm supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 writes it there and
    # Phi3Config defaults it) to the one inside the scaling
    if f.raw.get("original_max_position_embeddings") is not None:
        original = f.whole("original_max_position_embeddings")
    elif arch.default_original_max_positions is not None:
        original = arch.default_original_max_positions
    else:
        original = f.whole("original_max_position_embeddings", max_positions, raw=scaling)
    partial = 1.0
    if arch.partial_rotary:  # the scaling's value wins over the top-level one, as in transformers
        partial = f.number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0), raw=scaling)
        rotary_dim = int(head_dim * partial)
        if not 0 < partial <= 1 or rotary_dim < 2 or rotary_dim % 2:
            raise f.error(f"partial_rotary_factor {partial} of head_dim {head_dim} is not an even number of dims")
    scaled, llama3 = rope_type != "default", rope_type == "llama3"  # the types that divide by these factors
    rope = RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=f.number("factor", 1.0, raw=scaling, positive=scaled),
        low_freq_factor=f.number("low_freq_factor", 1.0, raw=scaling, positive=llama3),
        high_freq_factor=f.number("high_freq_factor", 4.0, raw=scaling, positive=llama3),
        original_max_position_embeddings=original,
        partial_rotary_factor=partial,
    )
    return _with_longrope(f, rope, scaling, head_dim, max_positions) if rope_type == "longrope" else rope


def _with_longrope(f: ConfigFields, rope: RopeConfig, scaling: dict, head_dim: int, max_positions: int) -> RopeConfig:
    """transformers' _compute_longrope_parameters: the factor defaults to the context growth and
    the attention factor to sqrt(1 + ln(factor) / ln(original context))."""
    short, long = f.numbers("short_factor", scaling, positive=True), f.numbers("long_factor", scaling, positive=True)
    frequencies = int(head_dim * rope.partial_rotary_factor) // 2
    for key, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != frequencies:
            raise f.error(f"{key} has {len(factors)} numbers; the rotary dims need {frequencies}")
    original = rope.original_max_position_embeddings
    if original < 2:  # its log divides the default attention factor
        raise f.error(f"original_max_position_embeddings is {original}, it must be at least 2 for longrope")
    factor = f.number("factor", max_positions / original, raw=scaling, positive=True)
    default_attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    attention = f.number("attention_factor", default_attention, raw=scaling, positive=True)
    return dataclasses.replace(rope, factor=factor, short_factor=short, long_factor=long, attention_factor=attention)


def _sliding_window(f: ConfigFields) -> int | None:
    value = f.raw.get("sliding_window")
    return None if value is None else f.whole("sliding_window")


def _gemma_ropes(f: ConfigFields, arch: Architecture, head_dim: int, max_positions: int) -> tuple[RopeConfig, RopeConfig | None]:
    """(global RoPE, local RoPE of the sliding layers or None). Gemma 3's transformers-5 config keeps
    one rope_parameters per layer type; its transformers-4 config has rope_theta and rope_scaling
    (the full layers') and rope_local_base_freq (the sliding layers', unscaled)."""
    if not arch.local_rope:
        return _rope_config(f, arch, head_dim, max_positions), None
    params = f.mapping("rope_parameters")
    if any(isinstance(v, dict) for v in params.values()):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(f.mapping("rope_scaling")), {}
    full.setdefault("rope_theta", f.number("rope_theta", 1_000_000.0, positive=True))
    local.setdefault("rope_theta", f.number("rope_local_base_freq", 10_000.0, positive=True))
    return _rope_config(f, arch, head_dim, max_positions, full), _rope_config(f, arch, head_dim, max_positions, local)


def _sliding_layers(f: ConfigFields, arch: Architecture, num_layers: int) -> tuple[bool, ...]:
    """Gemma's layer_types as one bool per layer (True: sliding_attention), or transformers' default."""
    types = f.raw.get("layer_types")
    if types is None:
        pattern = f.whole("sliding_window_pattern", arch.sliding_pattern)
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    kinds = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != num_layers or any(t not in kinds for t in types):
        raise f.error(f"layer_types must list {' or '.join(kinds)} once per layer ({num_layers})")
    return tuple(t == "sliding_attention" for t in types)


def _softcap(f: ConfigFields, key: str, default: float | None) -> float | None:
    # an absent key takes the config class's default; null turns the capping off
    if key not in f.raw:
        return default
    value = f.raw[key]
    if value is None:
        return None
    cap = f.number(key, 0.0)
    if cap <= 0:
        raise f.error(f"{key} is {value}, it must be positive (or null for no capping)")
    return cap


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; pass --model a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)."
        )
    raw = read_json_object(path)
    f = ConfigFields(raw, path)
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
    if raw.get("use_sliding_window") and architecture in ("Qwen2ForCausalLM", "Qwen3MoeForCausalLM"):
        raise ModelLoadError(f"{path} enables Qwen's sliding-window layers (use_sliding_window), which batchllm "
                             "does not support; batchllm supports sliding windows in Mistral, Mixtral, Phi-3 and Gemma 2/3 models.")
    arch = SUPPORTED_ARCHITECTURES[architecture]
    if arch.gemma:  # Gemma's MLP reads hidden_activation (its configs may carry a hidden_act too)
        activation = raw.get("hidden_activation") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ModelLoadError(f"{path} sets hidden_activation {activation!r}; batchllm runs Gemma models "
                                 "with gelu_pytorch_tanh only.")
        if raw.get("use_bidirectional_attention"):
            raise ModelLoadError(f"{path} sets use_bidirectional_attention (an embedding model); batchllm "
                                 "runs causal language models only.")
    else:
        activation = raw.get("hidden_act", "silu")
        if activation not in ("silu", "swish"):  # the same function under two names
            raise ModelLoadError(f"{path} sets hidden_act {activation!r}; batchllm runs SiLU-gated MLPs only.")
    max_positions = f.whole("max_position_embeddings", 4096)
    hidden = f.whole("hidden_size")
    num_heads = f.whole("num_attention_heads")
    num_kv_heads = f.whole("num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise f.error(f"num_key_value_heads ({num_kv_heads}) does not divide num_attention_heads ({num_heads})")
    if arch.gemma and "query_pre_attn_scalar" in raw and f.number("query_pre_attn_scalar", 0.0) <= 0:
        raise f.error("query_pre_attn_scalar must be positive")
    if raw.get("head_dim") is None and hidden % num_heads:
        raise f.error(f"num_attention_heads ({num_heads}) does not divide hidden_size ({hidden}) and no head_dim is given")
    head_dim = f.whole("head_dim", hidden // num_heads)
    num_layers = f.whole("num_hidden_layers")
    rope, local_rope = _gemma_ropes(f, arch, head_dim, max_positions)
    sliding_window = _sliding_window(f) if arch.sliding_window else None
    if arch.gemma:
        # the config classes' default when absent; null: full attention on every layer
        sliding_window = f.whole("sliding_window", 4096) if "sliding_window" not in raw else _sliding_window(f)
    return ModelConfig(
        architecture=architecture,
        vocab_size=f.whole("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.whole("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f.number("rms_norm_eps", 1e-6, positive=True),
        max_position_embeddings=max_positions,
        rope=rope,
        qkv_bias=arch.qkv_bias or bool(raw.get("attention_bias", False)),
        # Qwen2 has q/k/v bias but never an o_proj bias; the others tie both to attention_bias.
        o_bias=bool(raw.get("attention_bias", False)) and not arch.qkv_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch.gemma)),  # Gemma's configs default to tied
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        family=dataclasses.replace(_family_options(f, arch, hidden, head_dim), moe=_moe_options(f, arch)),
        sliding_window=sliding_window,
        sliding_layers=_sliding_layers(f, arch, num_layers) if arch.gemma else None,
        local_rope=local_rope,
    )


def _family_options(f: ConfigFields, arch: Architecture, hidden: int, head_dim: int) -> FamilyOptions:
    if arch.gemma:
        return FamilyOptions(
            qk_norm=arch.qk_norm,
            embedding_multiplier=hidden**0.5,
            attention_scale=f.number("query_pre_attn_scalar", 256.0) ** -0.5,
            gemma_norms=True,
            embedding_scale_in_model_dtype=True,
            mlp_activation="gelu_tanh",
            attention_softcap=_softcap(f, "attn_logit_softcapping", arch.default_softcaps[0]),
            final_logit_softcap=_softcap(f, "final_logit_softcapping", arch.default_softcaps[1]),
        )
    if not arch.multipliers:
        return FamilyOptions(qk_norm=arch.qk_norm, post_norm=arch.post_norm)
    # GraniteConfig's defaults: all 1.0, so a Granite without attention_multiplier scales q.k by 1; a 0
    # divides the logits by 0 or wipes out the embeddings, every layer's output or the attention pattern
    return FamilyOptions(
        qk_norm=arch.qk_norm,
        post_norm=arch.post_norm,
        embedding_multiplier=f.number("embedding_multiplier", 1.0, nonzero=True),
        residual_multiplier=f.number("residual_multiplier", 1.0, nonzero=True),
        logits_scaling=f.number("logits_scaling", 1.0, nonzero=True),
        attention_scale=f.number("attention_multiplier", 1.0, nonzero=True),
    )


def _moe_options(f: ConfigFields, arch: Architecture) -> MoeOptions | None:
    if arch.experts == "none":
        return None
    # Qwen3-MoE checkpoints of transformers 4 say num_experts, those of transformers 5 num_local_experts
    experts_key = "num_local_experts" if f.raw.get("num_local_experts") is not None else "num_experts"
    qwen = arch.experts == "qwen3_moe"  # the config classes' defaults: Qwen3-MoE 128 experts top-8, Mixtral 8 top-2
    num_experts = f.whole(experts_key, 128 if qwen else 8, minimum=0)
    top_k = f.whole("num_experts_per_tok", 8 if qwen else 2)
    if num_experts and top_k > num_experts:
        raise f.error(f"num_experts_per_tok ({top_k}) exceeds the {num_experts} experts")
    if arch.experts == "mixtral":
        if num_experts == 0:
            raise f.error("num_local_experts is 0; a Mixtral layer needs experts")
        return MoeOptions(num_experts, top_k, f.whole("intermediate_size"), norm_topk_prob=True)
    if num_experts == 0:  # transformers builds every layer with the dense MLP then
        return None
    num_layers = f.whole("num_hidden_layers")
    step = f.whole("decoder_sparse_step", 1)
    only_dense = f.raw.get("mlp_only_layers") or []
    if not isinstance(only_dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only_dense):
        raise f.error(f"mlp_only_layers is {only_dense!r}, not a list of layer numbers")
    # transformers' Qwen3MoeDecoderLayer: experts where the layer is not listed and (index + 1) % step == 0
    dense = tuple(i for i in range(num_layers) if i in only_dense or (i + 1) % step)
    norm = f.raw.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise f.error(f"norm_topk_prob is {norm!r}, not true or false")
    return MoeOptions(num_experts, top_k, f.whole("moe_intermediate_size"), norm, dense_layers=dense)
