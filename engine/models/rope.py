"""Rotary position embedding, computed exactly as Hugging Face transformers does (float32)."""
from __future__ import annotations

import math

import torch

from engine.model_config import RopeConfig


def uses_long_factors(rope: RopeConfig, max_positions: int) -> bool:
    """LongRoPE's factor set for a table of `max_positions`. transformers picks it per forward pass:
    long once the sequence is longer than original_max_position_embeddings (recomputing the cache
    when a generation crosses it), short before. The engine has one table for every sequence, so it
    picks the set transformers uses for a sequence of the engine's whole context: long when that
    exceeds the original context. Sequences shorter than the original context then differ from
    transformers (which would use the short set); limit the context to the original one to get it."""
    return max_positions > rope.original_max_position_embeddings


def inverse_frequencies(rope: RopeConfig, rotary_dim: int, max_positions: int) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies, with Llama-3, linear or LongRoPE scaling applied."""
    if rope.rope_type == "longrope":
        factors = rope.long_factor if uses_long_factors(rope, max_positions) else rope.short_factor
        shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**shape)  # transformers' exact order
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(rope: RopeConfig, rotary_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, 2, rotary_dim] float32: cos and sin per position (both halves repeated), times
    LongRoPE's attention factor."""
    inv_freq = inverse_frequencies(rope, rotary_dim, max_positions)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    table = torch.stack((emb.cos(), emb.sin()), dim=1)
    return table * rope.attention_factor if rope.attention_factor != 1.0 else table


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, rotary_dim] in x's dtype;
    # dims past rotary_dim (partial rotary) pass through
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
    return x * cos + _rotate_half(x) * sin


def apply_rope_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's meaning in three ops instead of seven (no negated copy, no concatenation), for full
    rotary (rotary_dim == head_dim); the rotated half is added by addcmul, so the last bit may differ.
    On CPU every op of a step is a pass over memory. x may be a strided view ([num_tokens, heads,
    head_dim], e.g. q and k side by side in the qkv projection); the result is a new contiguous tensor."""
    half = x.shape[-1] // 2
    assert cos.shape[-1] == x.shape[-1]
    out = x * cos
    # + rotate_half(x) * sin: the first half gets -x2 * sin, the second x1 * sin
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
