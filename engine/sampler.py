"""Token sampling: greedy, temperature, top-k, top-p, with batch-independent randomness.

The random numbers of a row come from a counter-based hash of (row sampling key, step, vocab id),
so a row's draw never depends on its batch neighbours, and no host sync or stateful generator is
needed. The draw uses the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cpu_fused import native_greedy_tokens, native_greedy_tokens_usable

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingTensors:
    temperatures: torch.Tensor  # [batch] float32; 0 = greedy
    top_ks: torch.Tensor  # [batch] int64; 0 = off
    top_ps: torch.Tensor  # [batch] float32; 1 = off
    keys: torch.Tensor  # [batch] int64, 63-bit row sampling keys
    steps: torch.Tensor  # [batch] int64, index of the token being drawn
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer hash (lowbias32) in int64 arithmetic; products may wrap, the low bits stay exact
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] float32 uniforms in (0, 1), a pure function of (key, step, vocab index)."""
    lo = (keys & _MASK32)[:, None]
    hi = ((keys >> 32) & _MASK32)[:, None]
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)[None, :]
    h = _mix32(vocab ^ _mix32(lo ^ _mix32(hi ^ _mix32(steps[:, None] & _MASK32))))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _apply_top_k_top_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if t.any_top_k:
        k = torch.where(t.top_ks > 0, t.top_ks.clamp(max=vocab), vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if t.any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p: drop a token when the mass before it already does
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= t.top_ps[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


# The token of a row whose scores hold a NaN (max() propagates NaN, so its maximum is NaN): a broken
# checkpoint or an overflow would otherwise come out as token 0 text with nothing said.
NAN_SCORES = -1


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits: [batch, vocab] -> [batch] int64: each row's first maximal index (NAN_SCORES for a row with
    a NaN score). On CPU in compiled code (kernels.cpu_fused; torch.max took ~0.3 ms of a 160-row step)."""
    if native_greedy_tokens_usable(logits):  # a CPU tensor, the library built
        return native_greedy_tokens(logits)  # marks a NaN row -1, NAN_SCORES
    # the first maximal index, as argmax, which on CPU took about twice as long ([160, 8192]: 1.8 vs 0.9 ms)
    best = logits.max(dim=-1)
    return torch.where(torch.isnan(best.values), NAN_SCORES, best.indices)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: [batch, vocab] float32 -> [batch] int64 token ids (NAN_SCORES for a row with a NaN score)."""
    greedy = greedy_tokens(logits)
    if t.all_greedy:
        return greedy
    temps = torch.where(t.temperatures > 0, t.temperatures, 1.0)
    scaled = logits / temps[:, None]
    if t.any_top_k or t.any_top_p:
        scaled = _apply_top_k_top_p(scaled, t)
    probs = scaled.softmax(dim=-1)
    exponential = -torch.log(counter_uniform(t.keys, t.steps, logits.shape[-1]))
    sampled = (probs / exponential).argmax(dim=-1)
    return torch.where((t.temperatures > 0) & (greedy != NAN_SCORES), sampled, greedy)
