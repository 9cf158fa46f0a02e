"""Tiny random-weight Hugging Face model directories for engine tests (test-only helper).

Each variant is a real transformers model (Llama, Mistral, Qwen2, Qwen3, ..., Qwen3-MoE, Mixtral) saved with save_pretrained as
safetensors, plus a byte-level BPE tokenizer trained offline on a generated corpus. Weights use a
large init range, random biases and random RMSNorm weights, because a default-initialised random
model has near-tied logits and greedy parity would then test float rounding, not the engine.

The reference outputs come from transformers reading the *saved directory* back, so a config
rewritten to another key style (transformers 4 vs 5) is checked to mean the same to HF as well.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"
SPECIAL_TOKENS = (BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>", EOT)
TOKENIZER_VOCAB = 420
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|eot|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
MAX_POSITIONS = 512

Family = Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "qwen3_moe", "mixtral",
                 "gemma2", "gemma3"]
ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
                                 "olmo2": "Olmo2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                 "mixtral": "MixtralForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
KeyStyle = Literal["v4", "v5"]  # transformers-4 keys (rope_theta, rope_scaling, torch_dtype) or 5


@dataclass(frozen=True)
class Variant:
    name: str
    family: Family
    key_style: KeyStyle
    config: dict = field(default_factory=dict)
    sharded: bool = False
    chat_template_file: bool = True  # chat_template.jinja, else inside tokenizer_config.json
    # Seeds are chosen so HF's greedy top-2 logit margin stays above 5e-4 on the parity prompts
    # (test_reference_has_no_near_ties); a near tie would make parity depend on float rounding.
    seed: int = 0
    max_model_len: int | None = None  # the engine's context in parity runs (None: max_position_embeddings)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so positions used by the tests (up to a few hundred) fall in the scaled range.
    "original_max_position_embeddings": 32,
}

# Phi-3 LongRoPE: 6 factors for rotary_dim 12 (head_dim 16, partial_rotary_factor 0.75). The model's
# context (1024) is twice the original (512), so cos/sin carry transformers' attention factor
# sqrt(1 + ln 2 / ln 512); the short set applies to sequences up to 512 tokens, the long one beyond.
_PHI3_ROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.2, 1.9, 3.1, 4.6, 7.5],
    "long_factor": [1.1, 2.3, 4.4, 9.0, 17.0, 31.0],
}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("llama_gqa", "llama", "v5", {"num_attention_heads": 4, "num_key_value_heads": 2},
                sharded=True, seed=1),
        Variant("llama_mha", "llama", "v4", {"num_attention_heads": 4, "num_key_value_heads": 4},
                chat_template_file=False, seed=2),
        Variant("llama3_rope_v4", "llama", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
                 "rope_scaling": dict(_LLAMA3_ROPE)}, seed=3),
        Variant("llama3_rope_v5", "llama", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2,
                 "rope_parameters": {**_LLAMA3_ROPE, "rope_theta": 500000.0}}, seed=4),
        Variant("qwen2", "qwen2", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                 "rope_theta": 1000000.0},
                chat_template_file=False, seed=10),
        Variant("qwen3", "qwen3", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                 "tie_word_embeddings": True},
                sharded=True, seed=10),
        # a window shorter than most prompts (and than a 16-token block), so it decides the output
        Variant("mistral_window", "mistral", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 13}, seed=20),
        Variant("mistral_full", "mistral", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24, "sliding_window": None},
                chat_template_file=False, seed=21),
        # full attention; phi3_window below has a window
        Variant("phi3", "phi3", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "partial_rotary_factor": 0.75,
                 "max_position_embeddings": 1024, "original_max_position_embeddings": 512,
                 "rope_scaling": dict(_PHI3_ROPE), "sliding_window": None},
                max_model_len=512, seed=20),
        Variant("granite", "granite", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                 "attention_bias": True, "mlp_bias": True, "embedding_multiplier": 6.0,
                 "residual_multiplier": 0.3, "attention_multiplier": 0.0625, "logits_scaling": 4.0},
                seed=34),
        Variant("olmo2", "olmo2", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0},
                sharded=True, seed=40),
        Variant("phi3_window", "phi3", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "partial_rotary_factor": 0.75,
                 "max_position_embeddings": 1024, "original_max_position_embeddings": 512,
                 "rope_scaling": dict(_PHI3_ROPE), "sliding_window": 13},
                max_model_len=512, seed=29),
        # mixtures of 4 experts, top-2: Qwen3-MoE's top-2 weights not renormalised (norm_topk_prob false)
        # and its middle layer dense (mlp_only_layers); Mixtral renormalises and has a window
        Variant("qwen3_moe", "qwen3_moe", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 3,
                 "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                 "norm_topk_prob": False, "mlp_only_layers": [1]},
                seed=50),
        Variant("mixtral_window", "mixtral", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "intermediate_size": 48, "sliding_window": 13},
                sharded=True, seed=60),
        # Gemma 2: layer 0 slides (a window shorter than most prompts), layer 1 attends to all; small
        # soft-caps so that capping changes the scores and logits; a q.k scale other than head_dim's
        Variant("gemma2", "gemma2", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 13,
                 "query_pre_attn_scalar": 24, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 12.0},
                seed=50),
        # Gemma 3: sliding, full, sliding layers; the sliding ones rotate by their own (local) RoPE,
        # the full one by a linearly scaled global RoPE; per-head q/k norms
        Variant("gemma3", "gemma3", "v5",
                {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 13,
                 "num_hidden_layers": 3, "query_pre_attn_scalar": 24,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                 "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
                seed=60),
        # Gemma 3 with transformers-4 keys: rope_theta, rope_scaling, rope_local_base_freq, no layer_types
        # (sliding_window_pattern 2: sliding, full)
        Variant("gemma3_v4", "gemma3", "v4",
                {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 13,
                 "query_pre_attn_scalar": 16, "sliding_window_pattern": 2, "final_logit_softcapping": 20.0,
                 "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}},
                seed=61),
    )
}


# ---------------------------------------------------------------- corpus and tokenizer

_SUBJECTS = ["the cat", "a farmer", "our team", "the old engine", "my sister", "the river", "every student",
             "the red fox", "a quiet town", "the committee", "this model", "the baker", "her neighbour"]
_VERBS = ["wants", "found", "will carry", "painted", "ignored", "measured", "described", "sold", "repaired",
          "followed", "remembers", "counted", "visited"]
_OBJECTS = ["a small boat", "the yellow house", "three apples", "the long report", "an empty bottle",
            "the morning train", "two blue chairs", "the winter market", "a broken clock", "the garden wall",
            "forty letters", "the last question"]
_TAILS = ["before noon.", "near the bridge.", "without asking.", "for the third time.", "in the rain.",
          "after dinner.", "with great care.", "quite slowly.", "on Tuesday.", "again and again.",
          "because it was late.", "at 7:30 pm!", "(or so they said)."]


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """English-like sentences, deterministic: enough variety for BPE merges, no downloads."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        out.append(s[0].upper() + s[1:])
    return out


@functools.lru_cache(maxsize=1)
def train_tokenizer_json() -> str:
    """A byte-level BPE tokenizer (~420 tokens) trained on `corpus()`, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


# Qwen's pre-tokenizer regex (transformers' models/qwen2/tokenization_qwen2.py, and every Qwen2/3
# tokenizer.json). transformers 5 builds a Qwen tokenizer from tokenizer.json's vocabulary and merges
# with this pipeline (NFC, this split, byte level) whatever the file says; real Qwen files say the same.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.lru_cache(maxsize=1)
def qwen_tokenizer_json() -> str:
    """The trained tokenizer with a Qwen tokenizer.json's normalizer and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    tok = Tokenizer.from_str(train_tokenizer_json())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def byte_fallback_tokenizer_json() -> str:
    """A Llama-2-style tokenizer.json (a SentencePiece BPE): spaces become "▁", characters outside the
    vocabulary become <0xNN> byte tokens, and decoding drops the text's leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # ordinary vocabulary entries, as in SentencePiece models, not special tokens
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return json.dumps(spec)


def tokenizer_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(train_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def special_id(token: str) -> int:
    from tokenizers import Tokenizer

    tid = Tokenizer.from_str(train_tokenizer_json()).token_to_id(token)
    assert tid is not None, token
    return tid


def write_tokenizer(out: Path, *, chat_template_file: bool, family: Family = "llama") -> None:
    text = qwen_tokenizer_json() if family in ("qwen2", "qwen3", "qwen3_moe") else train_tokenizer_json()
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    cfg: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        # Explicit null: otherwise transformers' Qwen2Tokenizer (picked for model_type qwen2 whatever
        # tokenizer_class says) adds its default unk "<|endoftext|>" as token 420, past the model vocab.
        "unk_token": None,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template_file:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


# ---------------------------------------------------------------- models

def _hf_config(variant: Variant):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "phi3": Phi3Config, "granite": GraniteConfig, "olmo2": Olmo2Config, "qwen3_moe": Qwen3MoeConfig,
           "mixtral": MixtralConfig, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[variant.family]
    kwargs = dict(
        vocab_size=tokenizer_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=special_id(BOS),
        eos_token_id=special_id(EOS),
        pad_token_id=None,
    )
    kwargs.update(variant.config)
    if variant.family == "qwen2":
        kwargs.update(use_sliding_window=False)
    cfg = cls(**kwargs)
    cfg.architectures = [ARCHITECTURES[variant.family]]
    return cfg


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic random weights, including biases and norm weights (HF inits those to 0 and 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # in [0.5, 1.5): not one, not zero
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model_dir(variant: Variant, out: Path) -> Path:
    """Create `out` holding the variant's config, safetensors weights and tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(variant.seed)
    cfg = _hf_config(variant)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    _randomize(model, variant.seed, std=cfg.initializer_range)
    out.mkdir(parents=True, exist_ok=True)
    # ~64 KiB shards: a couple of hundred KiB of weights end up in several files plus an index.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="64KB" if variant.sharded else "1GB")
    # save_pretrained writes generation_config.json; make it list two EOS ids like Llama-3 does.
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = [special_id(EOS), special_id(EOT)]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    rewrite_config_keys(out / "config.json", variant.key_style)
    write_tokenizer(out, chat_template_file=variant.chat_template_file, family=variant.family)
    return out


def rewrite_config_keys(path: Path, style: KeyStyle) -> None:
    """Rewrite config.json to one transformers generation's keys.

    transformers 5.x writes `rope_parameters` (with rope_theta inside) and `dtype`; published
    checkpoints made with 4.x carry `rope_theta` top level, `rope_scaling` (or null) and `torch_dtype`.
    """
    raw = json.loads(path.read_text())
    if any(isinstance(v, dict) for v in (raw.get("rope_parameters") or {}).values()):
        _rewrite_layer_type_ropes(raw, style)
        path.write_text(json.dumps(raw, indent=2, sort_keys=True))
        return
    rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None) or {}
    rope = dict(rope)
    dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None) or "float32"
    if style == "v5":
        rope.setdefault("rope_theta", raw.pop("rope_theta", 10000.0))
        rope.setdefault("rope_type", "default")
        if "partial_rotary_factor" in raw:
            rope.setdefault("partial_rotary_factor", raw.pop("partial_rotary_factor"))
        raw["rope_parameters"] = rope
        raw["dtype"] = dtype
    else:
        raw["rope_theta"] = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        if "partial_rotary_factor" in rope:  # top level in transformers-4 checkpoints (Phi-3, Phi-4)
            raw["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        raw["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        raw["torch_dtype"] = dtype
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))


def _rewrite_layer_type_ropes(raw: dict, style: KeyStyle) -> None:
    """Gemma 3 writes one rope_parameters per layer type (transformers 5); its transformers-4 keys are
    rope_theta and rope_scaling (full layers) and rope_local_base_freq (sliding layers)."""
    dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None) or "float32"
    if style == "v5":
        raw["dtype"] = dtype
        return
    params = raw.pop("rope_parameters")
    full, local = dict(params["full_attention"]), dict(params["sliding_attention"])
    raw["rope_theta"] = full.pop("rope_theta")
    raw["rope_local_base_freq"] = local["rope_theta"]
    raw["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    raw["torch_dtype"] = dtype
    raw.pop("layer_types", None)  # older configs: sliding_window_pattern alone says which layers slide


# ---------------------------------------------------------------- prompts and reference outputs

def make_prompts(lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, cut from tokenized corpus text, BOS first."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(train_tokenizer_json())
    rng = random.Random(seed)
    sentences = corpus(400, seed=seed + 1)
    prompts = []
    for n in lengths:
        count = n // 4 + 2  # a sentence is well over 4 tokens, so this always suffices
        ids = tok.encode(" ".join(rng.choice(sentences) for _ in range(count))).ids
        assert len(ids) >= n
        prompts.append(ids[:n])
    return prompts


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each generated position


def load_hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # ignore_eos: HF fills eos_token_id=None from the model's generation config, so clear it there.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[Reference]:
    """transformers' greedy output per prompt, unpadded (one prompt per generate call)."""
    refs = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=0, return_dict_in_generate=True, output_logits=True,
        )
        new = out.sequences[0, ids.shape[1]:].tolist()
        assert len(new) == max_new_tokens, "HF stopped early; EOS was not disabled"
        margins = []
        for step_logits in out.logits:
            top2 = torch.topk(step_logits[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        refs.append(Reference(new, margins))
    return refs
