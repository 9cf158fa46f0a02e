"""A small random-weight Llama model generated locally, so batchllm runs with no downloads.

The directory is a standard Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json): the engine loads it through the same path as any
real model, which keeps the demo honest. Generation is deterministic (fixed seed, CPU generator),
so every machine builds the same bytes and outputs are reproducible across runs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cache_root

# Bump the version whenever the generated content changes: old cache dirs are then left alone
# instead of being silently reused with different weights.
DEMO_MODEL_NAME = "demo-llama-v1"
_SEED = 20241203


@dataclass(frozen=True)
class DemoShape:
    """The random Llama's sizes; benches build smaller ones with the same weight recipe and tokenizer."""

    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DEMO_SHAPE = DemoShape()

BOS, EOS, USER, ASSISTANT, SYSTEM = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, SYSTEM)
BOS_ID, EOS_ID = 256, 257  # the byte tokens take ids 0..255, specials follow in SPECIAL_TOKENS order
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def default_cache_root() -> Path:
    """`$BATCHLLM_CACHE_DIR`, else `~/.cache/batchllm`."""
    return cache_root()


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Path of the demo model directory, generating it on first use.

    Built in a temporary sibling directory and renamed into place, so a reader never sees a
    half-written model and two processes racing both end up with the same complete directory.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / DEMO_MODEL_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.tmp-", dir=root))
    try:
        write_model_dir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy first (the target is a non-empty directory now).
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    # The rename is atomic, so any existing target is complete; checking the files guards against
    # a directory someone created by hand or truncated.
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((path / n).is_file() for n in names)


def write_model_dir(out: Path, shape: DemoShape = DEMO_SHAPE) -> None:
    """The model files into the existing directory `out` (the demo model itself with the default shape)."""
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(_config(shape), indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    save_file(_weights(shape), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(out)


def _config(shape: DemoShape) -> dict:
    # Transformers-4 style keys (rope_theta, torch_dtype): what most published Llama checkpoints use.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB_SIZE,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": 0.02,
    }


def _weights(shape: DemoShape) -> dict[str, torch.Tensor]:
    """Random weights scaled so that greedy text is varied rather than one repeated token.

    Projections use gain/sqrt(fan_in). With unit gains the residual stream is dominated by the
    current token's embedding, so the next token is a function of the current one and greedy text
    falls into 2-3 token cycles; peaked attention (q/k gain 4), strong residual writers and a
    sharper gate make the output depend on context. Gains were picked by measuring distinct tokens
    in greedy continuations of a few prompts. The output head favours printable ASCII bytes so demo
    output reads as text rather than broken UTF-8.
    """
    hidden, heads, kv_heads, head_dim = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
    inter = shape.intermediate
    g = torch.Generator(device="cpu").manual_seed(_SEED)

    def normal(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=g, dtype=torch.float32) * std).contiguous()

    def norm_weight() -> torch.Tensor:
        return (1.0 + normal(hidden, std=0.1)).contiguous()

    qk_gain, residual_gain, gate_gain = 4.0, 4.0, 2.0
    residual_scale = residual_gain / math.sqrt(2 * shape.layers)
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(VOCAB_SIZE, hidden, std=1.0)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden, std=qk_gain / math.sqrt(hidden))
        w[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden, std=qk_gain / math.sqrt(hidden))
        w[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden, std=1.0 / math.sqrt(hidden))
        w[p + "self_attn.o_proj.weight"] = normal(
            hidden, heads * head_dim, std=residual_scale / math.sqrt(heads * head_dim)
        )
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        w[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=gate_gain / math.sqrt(hidden))
        w[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=1.0 / math.sqrt(hidden))
        w[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=residual_scale / math.sqrt(inter))
    w["model.norm.weight"] = norm_weight()
    head = normal(VOCAB_SIZE, hidden, std=4.0 / math.sqrt(hidden))
    row_scale = torch.full((VOCAB_SIZE, 1), 0.1)
    row_scale[32:127] = 1.0  # printable ASCII
    row_scale[ord("\n")] = 0.6
    w["lm_head.weight"] = (head * row_scale).contiguous()
    return w


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2) + "\n", encoding="utf-8"
    )
