"""The engine's public face: build from a model directory, feed (key, token ids, params) requests,
get finished results as they finish."""
from __future__ import annotations

import atexit
import gc
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Hashable, Iterable, Iterator, Sequence as Seq

import numpy as np

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.grammar_mask import GrammarMasks
from engine.model_config import ModelConfig, load_model_config
from engine.model_runner import ModelRunner
from engine.plan_carry import Carry, adopt_carry, choose_carry, split_for_carry
from engine.planning import PackedSequences, PlanChunk, plan_execution
from engine.results import EngineStats, GenerationResult
from engine.sampler import NAN_SCORES
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler
from engine.sequence import Sequence
from engine.shared_prefix import SharedPrefixState
from engine.stop_strings import first_stop, stop_string_at
from engine.tokenizer import Tokenizer

Request = tuple[Hashable, Seq[int], SamplingParams]


@dataclass(frozen=True)
class ModelInfo:
    model_dir: str
    architecture: str
    max_model_len: int
    num_parameters: int
    device: str
    dtype: str
    kv_cache_blocks: int
    block_size: int
    attention_backend: str
    decode_attention: str  # "compiled" (the CPU kernel), else the backend, with why not on a CPU
    linear_layers: str  # "onednn-packed" (CPU), else "torch", with why not on a CPU
    cuda_graphs: bool


def freeze_startup_heap() -> None:
    """Keeps the objects alive when the process's first engine is built (imports, the model, the
    engine: ~170k of them) out of the garbage collector's full passes: each such pass scanned them
    all, about 0.1 s at a time, whenever the job's own allocations triggered one (measured: one in
    three document-QA runs of 0.9 s lost 0.09 s). Collected first, so no garbage cycle is kept for
    good; a frozen object is still freed when its last reference goes (an engine holds no reference
    cycle: tests/test_engine_heap.py). Only while nothing is frozen: a later engine (the one that
    replaces an engine dropped after running out of memory, while the error's traceback still holds
    the old one in a reference cycle) must not freeze that cycle, or the old engine would never be
    freed. Thawed at exit, so the interpreter's last collection still finalizes everything
    (nanobind, in Triton, reports leaked objects otherwise)."""
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once, however many times a process freezes
    atexit.register(gc.unfreeze)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        if not Path(config.model_dir).is_dir():
            raise ModelLoadError(f"Model directory {config.model_dir} does not exist.")
        self.config = config
        self.model_config: ModelConfig = load_model_config(config.model_dir)
        self.tokenizer = tokenizer or Tokenizer(config.model_dir)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.runner = ModelRunner(self.model_config, config, self.max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, prefix_cache=config.prefix_sharing == "lru"
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_tokens, config.max_num_seqs, config.decode_reservation,
            learn_lengths=config.learn_decode_lengths,
        )
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.grammar = GrammarMasks(
            config.model_dir, self.model_config.vocab_size, self.eos_token_ids,
            host_logits=self.runner.device.type == "cpu",
        )
        self.model_info = ModelInfo(
            model_dir=str(config.model_dir),
            architecture=self.model_config.architecture,
            max_model_len=self.max_model_len,
            num_parameters=self.runner.num_parameters,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            kv_cache_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            attention_backend=self.runner.attention_backend.name,
            decode_attention=self.runner.decode_attention_path(),
            linear_layers=self.runner.linear_layers,
            cuda_graphs=self.runner.decode_graphs is not None,
        )
        self._ready: deque[GenerationResult] = deque()
        self._prompt_tokens = 0
        self._prefill_tokens = 0
        self._shared_prefix_tokens = 0  # of _prefill_tokens: computed for shared prefixes (plan mode)
        self._sampled_tokens = 0  # tokens generated so far, rows still running included (for progress)
        self._completion_tokens = 0
        self._finished = 0
        self._steps = 0
        self._unique_prompt_tokens = 0
        self._planned_prompt_tokens = 0
        # plan mode: tokens shared across a chunk cut that the wave after it computed again (plan_carry
        # makes this 0); counted when the wave adopts the carry, so an interrupted run counts only cuts crossed
        self._cut_recomputed_tokens = 0
        self._carry: Carry | None = None
        self._carry_prefixes = 0  # prefix states inserted to carry a cut (split_for_carry), for their ids
        freeze_startup_heap()

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, key: Hashable, token_ids: Seq[int], params: SamplingParams) -> None:
        """Queue one request, run in arrival order (no global plan; `lru` mode still hits the
        automatic prefix cache). One that can never run comes back from step() as an error."""
        seq = self._new_sequence(key, token_ids, params)
        if seq is not None:
            self.scheduler.add(seq)

    def _new_sequence(self, key: Hashable, token_ids: Seq[int], params: SamplingParams) -> Sequence | None:
        error = self._check_request(token_ids, params)
        if error is not None:
            self._ready.append(GenerationResult(key, "", (), "error", len(token_ids), error, refused=True))
            return None
        max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        seq = Sequence(key, token_ids, params, max_tokens)
        self.grammar.check(seq)
        return seq

    def add_planned(self, requests: Seq[Request], shared_with_next: int = 0) -> None:
        """Queue a wave of requests in the order of their prefix plan: every shared prefix is computed
        once, just before the rows that start on it. With `shared_with_next` (requests in sorted order,
        the last sharing that many leading tokens with the next wave's first), a prefix state covering
        them is kept for the next wave (plan_carry), so a prefix spanning the cut is computed once."""
        carry, self._carry = self._carry, None
        seqs = [s for s in (self._new_sequence(*r) for r in requests) if s is not None]
        if not seqs:
            if carry is not None:
                self.scheduler.drop_dependent(carry.state)
            return
        plan = plan_execution(
            PackedSequences.from_lists([s.token_ids for s in seqs]), np.array([s.max_tokens for s in seqs])
        )
        # Where each item starts: (prefix id or -1, tokens of it reused), per prefix and per row.
        prefix_start = list(zip(plan.prefix_parent.tolist(), plan.prefix_start_len.tolist()))
        row_start = list(zip(plan.row_start_prefix.tolist(), plan.row_start_len.tolist()))
        items = [(is_prefix, index, *(prefix_start[index] if is_prefix else row_start[index]))
                 for is_prefix, index in zip(plan.item_is_prefix.tolist(), plan.item_index.tolist())]
        adoption = None
        if carry is not None:
            adoption = adopt_carry(carry, items, plan.prefix_length.tolist(), plan.prefix_source_row.tolist(),
                                   plan.prefix_keeps_logits.tolist(), seqs)
            self._cut_recomputed_tokens += carry.length - adoption.covered_tokens
        covered = adoption.covered_tokens if adoption is not None else 0
        self._unique_prompt_tokens += plan.unique_prompt_tokens - covered
        self._planned_prompt_tokens += sum(len(s) for s in seqs)
        states: list[SharedPrefixState] = []
        for prefix_id, (length, source_row, dependents, keeps_logits) in enumerate(
            zip(
                plan.prefix_length.tolist(),
                plan.prefix_source_row.tolist(),
                plan.prefix_dependents.tolist(),
                plan.prefix_keeps_logits.tolist(),
            )
        ):
            source = seqs[source_row]
            seq = Sequence(("prefix", prefix_id), source.token_ids[:length], source.params, 0)
            seq.is_prefix = True
            states.append(SharedPrefixState(prefix_id, seq, dependents, keeps_logits))
            seq.prefix_state = states[-1]
        for is_prefix, index, start, start_len in items:
            if adoption is not None and is_prefix and index in adoption.skipped_prefixes:
                continue
            seq = states[index].seq if is_prefix else seqs[index]
            carried = adoption.start_lens.get((is_prefix, index)) if adoption is not None else None
            if carried is not None:
                if carried > 0:
                    assert carry is not None
                    seq.start_prefix, seq.start_len = carry.state, carried
                    carry.state.dependents_left += 1
            elif start >= 0:
                seq.start_prefix = states[start]
                seq.start_len = start_len
            self.scheduler.add(seq)
        if carry is not None:
            self.scheduler.drop_dependent(carry.state)  # the placeholder: its real dependents hold it now
        self._carry = self._keep_for_next(seqs[-1], shared_with_next)

    def _keep_for_next(self, last_row: Sequence, shared_with_next: int) -> Carry | None:
        shared = min(shared_with_next, len(last_row))
        if shared <= 0:
            return None
        carry = choose_carry(last_row, shared)
        if carry is None or carry.length < shared:
            self._carry_prefixes += 1
            state = split_for_carry(last_row, shared, -self._carry_prefixes)
            self.scheduler.add_before(state.seq, last_row)
            carry = Carry(state, shared)
        carry.state.dependents_left += 1  # a placeholder for the next chunk's items
        return carry

    def _check_request(self, token_ids: Seq[int], params: SamplingParams) -> str | None:
        prompt_len = len(token_ids)
        if prompt_len == 0:
            return "The prompt is empty (0 tokens)."
        # The embedding has vocab_size rows: a larger id (a token the tokenizer files add past the
        # model's vocabulary) would crash the whole step, not just this row.
        largest = max(token_ids)
        if largest >= self.model_config.vocab_size:
            token = self.tokenizer.id_to_token(largest)
            return (
                f"The prompt has token id {largest}{f' ({token!r})' if token is not None else ''}, past the "
                f"model's vocabulary of {self.model_config.vocab_size} (config.json vocab_size): the tokenizer "
                "files add tokens the model has no weights for; fix the tokenizer files (or remove that text "
                "from the row)."
            )
        if prompt_len >= self.max_model_len:
            return (
                f"The prompt has {prompt_len} tokens but the model's context is {self.max_model_len} "
                "tokens; shorten the row or the template."
            )
        max_len = min(prompt_len + params.max_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if self.block_manager.blocks_for_tokens(max_len) > self.block_manager.num_blocks:
            return (
                f"The prompt ({prompt_len} tokens) plus max tokens needs {max_len} tokens of KV cache but "
                f"the cache holds {capacity}; raise --kv-cache-memory (or --kv-cache-tokens) or lower --max-tokens."
            )
        return None

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self.scheduler.has_unfinished()

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> list[GenerationResult]:
        finished = list(self._ready)
        self._ready.clear()
        if not self.scheduler.has_unfinished():
            return finished
        chunks = self.scheduler.schedule()
        assert chunks, "the scheduler made no progress although requests are pending"
        sampling = [c for c in chunks if c.samples]
        seqs = [c.seq for c in sampling]
        new_tokens = self.runner.run(chunks, self.block_manager.take_pending_copies(), self.grammar.begin_step(seqs))
        self.scheduler.commit(chunks)
        self._steps += 1
        for chunk in chunks:
            if chunk.num_prefill_tokens:
                self._prefill_tokens += chunk.num_prefill_tokens
                if chunk.seq.is_prefix:
                    self._shared_prefix_tokens += chunk.num_prefill_tokens
        self._sampled_tokens += len(sampling)
        for chunk, token in zip(sampling, new_tokens, strict=True):
            result = self._append_token(chunk, token)
            if result is not None:
                finished.append(result)
        return finished

    def _append_token(self, chunk: ScheduledChunk, token: int) -> GenerationResult | None:
        seq = chunk.seq
        if token == NAN_SCORES:
            return self._nan_scores(seq)
        seq.token_ids.append(token)
        params = seq.params
        reason: str | None = None
        if not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif params.structured is not None and token in self.eos_token_ids:
            reason = "stop"  # the grammar allowed EOS: the value is complete, whatever ignore_eos says
        elif token in params.stop_token_ids:
            reason = "stop"
        elif params.stop and self._hits_stop_string(seq):
            reason = "stop"
        elif seq.num_completion_tokens >= seq.max_tokens:
            reason = "length"
            if params.structured is not None and self.grammar.must_end(seq):
                # the value is whole: the grammar allows only end-of-sequence next, so the model could
                # only have ended it; it stopped, it was not cut (its last token is part of the answer)
                return self._finish(seq, "stop", last_token_shown=True)
        if reason is None:
            return None
        return self._finish(seq, reason, last_token_shown=reason == "length" or seq.stop_text_end is not None)

    def _finish(self, seq: Sequence, reason: str, last_token_shown: bool) -> GenerationResult:
        """last_token_shown: the last token is part of the answer's text (not an EOS or stop token)."""
        self.grammar.release(seq)
        self.scheduler.finish(seq)
        return self._result(seq, reason, last_token_shown)

    def _nan_scores(self, seq: Sequence) -> GenerationResult:
        """The row ends as an error: its next-token scores were NaN, so no answer can be trusted."""
        self.grammar.release(seq)
        self.scheduler.finish(seq)
        self._finished += 1
        self._prompt_tokens += seq.num_prompt_tokens
        error = (f"the model's scores were NaN at answer token {seq.num_completion_tokens + 1}: the weights or "
                 "config.json values are broken, or float16 overflowed (try --dtype bfloat16 or float32)")
        return GenerationResult(seq.key, "", (), "error", seq.num_prompt_tokens, error,
                                prefix_hit_tokens=seq.prefix_hit_tokens)

    def _hits_stop_string(self, seq: Sequence) -> bool:
        assert seq.stop_watch is not None  # a sequence whose params have stop strings has one
        seq.stop_text_end = seq.stop_watch.find(self.tokenizer.decode, seq.token_ids)
        return seq.stop_text_end is not None

    def _result(self, seq: Sequence, reason: str, last_token_shown: bool) -> GenerationResult:
        ids = seq.completion_token_ids
        shown = ids if last_token_shown else ids[:-1]  # the EOS / stop token is not part of the answer
        text = self.tokenizer.decode(shown)
        stop_string = None
        if seq.stop_text_end is not None:
            # the watch's index, unless a byte-fallback run it had committed was re-decoded (stop_strings.py)
            cut = first_stop(text, seq.params.stop)
            end = seq.stop_text_end if cut is None else cut
            stop_string = stop_string_at(text, end, seq.params.stop)
            text = text[:end]
        self._finished += 1
        self._prompt_tokens += seq.num_prompt_tokens
        self._completion_tokens += len(ids)
        return GenerationResult(seq.key, text, tuple(ids), reason, seq.num_prompt_tokens,  # type: ignore[arg-type]
                                prefix_hit_tokens=seq.prefix_hit_tokens,
                                stop_string=stop_string)

    def generate(self, requests: Iterable[Request]) -> Iterator[GenerationResult]:
        """Runs all requests, pulling them lazily so a long stream is never held at once; yields
        results in finish order (match them by key). In `plan` mode requests are planned in waves of
        `plan_wave_rows` (a prefix shared across waves is computed once per wave): a caller that has
        the whole job's global order passes its chunks to `generate_planned` instead."""
        plan = self.config.prefix_sharing == "plan"
        wave = self.config.plan_wave_rows if plan else 2 * self.config.max_num_seqs
        pending = iter(requests)
        waves = ((batch, 0) for batch in iter(lambda: list(islice(pending, wave)), []))
        return self._run_waves(waves, planned=plan)

    def generate_planned(self, chunks: Iterable[PlanChunk]) -> Iterator[GenerationResult]:
        """Runs a job given as chunks of its rows in global sorted order (see plan_chunks): each chunk
        is planned on its own, the prefix spanning a cut is carried over (plan_carry), and the next
        chunk is pulled only once the current one is fully admitted, so the caller can prepare it
        meanwhile. Results come in finish order."""
        return self._run_waves(((c.requests, c.shared_with_next) for c in chunks), planned=True)

    def _run_waves(self, waves: Iterator[tuple[Seq[Request], int]], planned: bool) -> Iterator[GenerationResult]:
        exhausted = False
        while True:
            if not exhausted and not self.scheduler.waiting:
                wave = next(waves, None)
                if wave is None:
                    exhausted = True
                    if self._carry is not None:  # the last chunk said more would come: nothing did
                        self.scheduler.drop_dependent(self._carry.state)
                        self._carry = None
                elif planned:
                    self.add_planned(*wave)
                else:
                    for request in wave[0]:
                        self.add_request(*request)
            if not self.has_unfinished():
                if exhausted:
                    return
                continue
            yield from self.step()

    def stats(self) -> EngineStats:
        return EngineStats(
            requests_finished=self._finished,
            prompt_tokens=self._prompt_tokens,
            prefill_tokens=self._prefill_tokens,
            shared_prefix_tokens=self._shared_prefix_tokens,
            sampled_tokens=self._sampled_tokens,
            completion_tokens=self._completion_tokens,
            preemptions=self.scheduler.num_preemptions,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            unique_prompt_tokens=self._unique_prompt_tokens,
            cut_recomputed_tokens=self._cut_recomputed_tokens,
            sharing_fallbacks=self.scheduler.num_sharing_fallbacks,
            peak_kv_blocks=self.block_manager.peak_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            steps=self._steps,
            graph_steps=self.runner.decode_graphs.steps if self.runner.decode_graphs is not None else 0,
        )
