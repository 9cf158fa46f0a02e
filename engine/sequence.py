"""Sequence: the unit of state the scheduler, block manager and model runner share."""
from __future__ import annotations

import enum
import hashlib
from itertools import count
from typing import TYPE_CHECKING, Hashable, Sequence as Seq

from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStringWatch

if TYPE_CHECKING:
    from engine.shared_prefix import SharedPrefixState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = count()


def sampling_key(seed: int, key: Hashable) -> int:
    """A 63-bit number naming the random stream of one row: the same (seed, key) always draws the
    same numbers, whatever else is in the batch and whether or not the job was resumed."""
    digest = hashlib.blake2b(f"{seed}\x00{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Sequence:
    def __init__(self, key: Hashable, token_ids: Seq[int], params: SamplingParams, max_tokens: int) -> None:
        self.seq_id = next(_ids)
        self.key = key
        self.params = params
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens  # params.max_tokens, clamped to what the context allows
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.prefill_len = 0  # tokens to prefill since the last admission (the rest are decodes)
        self.block_table: list[int] = []
        self.num_registered_blocks = 0  # full blocks already named in the automatic prefix cache
        # chained hashes of leading full blocks, extended as blocks fill (engine/block_manager.py)
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        self.sampling_key = sampling_key(params.seed, key)
        self.finish_reason: str | None = None
        self.stop_text_end: int | None = None  # where a stop string starts in the decoded text
        self.stop_watch = StopStringWatch(params.stop, self.num_prompt_tokens) if params.stop else None
        self.is_prefix = False  # a prefill-only sequence computing a shared prefix
        self.prefix_state: SharedPrefixState | None = None  # set on prefix sequences
        self.start_prefix: SharedPrefixState | None = None  # the computed prefix it begins on
        self.start_len = 0  # tokens of that prefix it reuses
        self.shared_blocks = 0  # leading blocks shared with its group (for grouped decode attention)
        # prompt tokens its last admission found computed (a shared prefix, cached blocks): its result
        # carries them, so a report counts the reuse of the rows it reports and no others
        self.prefix_hit_tokens = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone; prompt and generated tokens are prefilled again.
        The tokens stay, so their block hashes and the stop-string watch stay valid."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.shared_blocks = 0
        self.status = SequenceStatus.WAITING
