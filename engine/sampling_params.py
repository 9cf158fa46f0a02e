"""Per-request sampling settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.grammar import StructuredOutput

GREEDY_BELOW = 1e-5  # a temperature below this samples greedily


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature 0 means greedy, as does any below GREEDY_BELOW (logits / 1e-38 overflow to inf and the
    softmax to NaN; vLLM draws the same line). top_k 0 and top_p 1.0 disable those filters. The random draw of a
    request depends only on (seed, request key, step), never on its batch neighbours.
    ignore_eos generates past the model's EOS ids until max_tokens (as vLLM's); stop strings and
    stop_token_ids still end a request.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    structured: StructuredOutput | None = None  # answers follow this grammar (engine/grammar.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1.")
        if not 0 <= self.temperature < math.inf:
            raise ValueError("temperature must be 0 (greedy) or a positive finite number.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1].")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive.")
        if any(not text for text in self.stop):
            # it would match nothing, silently (a script's --stop "$VAR" with VAR unset); vLLM refuses it too
            raise ValueError("a stop string must not be empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
