"""What the engine hands back for each finished request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class GenerationResult:
    key: Hashable
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None
    # An error the engine's request check found before the row ran (empty prompt, a token past the
    # vocabulary, too long for the context or the KV cache): none of its prompt was computed. Other
    # errors (NaN scores) end a row that was computed.
    refused: bool = False
    # Prompt tokens of this row reused instead of computed (a shared prefix, cached blocks), as its last
    # admission found them.
    prefix_hit_tokens: int = 0
    # The stop string that ended the answer (finish_reason "stop"; `text` ends where it starts), or None.
    # Inside a structured value it cuts the value: what is left is not the model's answer.
    stop_string: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class EngineStats:
    """Counters over the engine's lifetime; prefill_tokens counts tokens actually computed in prefill
    (recomputation after preemption included)."""

    requests_finished: int
    prompt_tokens: int
    prefill_tokens: int
    completion_tokens: int
    preemptions: int
    prefix_hit_tokens: int  # prompt tokens whose KV was reused instead of computed
    unique_prompt_tokens: int  # trie token count of the planned requests (plan mode), less what waves carried over
    sharing_fallbacks: int  # shared prefixes dropped because memory could not hold them
    peak_kv_blocks: int
    kv_blocks_total: int
    steps: int
    graph_steps: int = 0  # decode steps replayed from CUDA graphs (or run on their static buffers)
    shared_prefix_tokens: int = 0  # of prefill_tokens: computed once for a shared prefix (plan mode)
    sampled_tokens: int = 0  # tokens generated, rows not finished yet included
    cut_recomputed_tokens: int = 0  # plan mode: tokens shared across a chunk cut crossed, computed again after it
