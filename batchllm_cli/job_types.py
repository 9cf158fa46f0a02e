"""The `run` job's settings, report, observer and validated invocation (plain data)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from batchllm_cli.checkpoint import Committed, RunDir
from batchllm_cli.durable import remove_dirs
from batchllm_cli.file_lock import FileLock
from batchllm_cli.collector import OutputColumns
from batchllm_cli.marker import Marker
from batchllm_cli.planned_feed import DEFAULT_PLAN_CHUNK_TOKENS
from batchllm_cli.prompt_options import PromptOptions
from batchllm_cli.prompts import PromptEncoder
from batchllm_cli.structured_output import Constraint, TypedField
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS, ROW_ID, InputOptions, TableSource
from batchllm_cli.templates import PromptTemplate

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from engine import EngineConfig, SamplingParams, Tokenizer

DEFAULT_CHECKPOINT_ROWS = 1000
DEFAULT_CHECKPOINT_SECONDS = 60.0


@dataclass(frozen=True)
class WorkDone:
    """This attempt's progress so far, for progress lines (plain counters, read between engine steps)."""

    rows: int = 0  # rows finished (answered or failed)
    rows_failed: int = 0
    rows_run: int = 0  # of `rows`, those the engine ran (the others failed before it: template, length)
    prompt_tokens: int = 0  # prompt tokens of the rows the engine ran
    completion_tokens: int = 0  # output tokens of the rows the engine ran
    prompt_tokens_processed: int = 0  # prompt positions passed (computed or reused), running rows included
    output_tokens: int = 0  # tokens generated, running rows included
    elapsed_s: float | None = None  # generation so far (None: not measured; 0: the engine has no work yet)


class RunObserver(Protocol):
    """What the job tells its caller while it runs (the CLI draws progress from this). `work` may be
    called at any time, from another thread, until `finish`."""

    def notice(self, message: str) -> None: ...

    def start(self, total_rows: int, resumed_rows: int, work: Callable[[], WorkDone]) -> None: ...

    def advance(self, rows: int, completion_tokens: int) -> None: ...

    def finish(self) -> None: ...


class SilentObserver:
    def notice(self, message: str) -> None:
        pass

    def start(self, total_rows: int, resumed_rows: int, work: Callable[[], WorkDone]) -> None:
        pass

    def advance(self, rows: int, completion_tokens: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class RunSettings:
    """One `run` invocation. None means "the default" (of the recipe, the model or the engine)."""

    input: Path | str | tuple[str, ...]  # INPUT: one or several paths, a directory, a pattern, `-`, URLs
    template: str
    output: Path
    model: Path | None = None
    column: str = "response"
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    chat: bool | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: int | None = None
    kv_cache_tokens: int | None = None
    max_batch_tokens: int | None = None
    block_size: int | None = None
    prefix_sharing: str = "plan"
    attention_backend: str = "auto"
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    workers: int | None = None  # scale out over N engine replicas through Ray (ray_run.py)
    ray_address: str | None = None  # an existing Ray cluster to join (else a local one is started)
    batch_rows: int = 1024  # rows rendered and tokenized per step of the input stream
    plan_chunk_tokens: int = DEFAULT_PLAN_CHUNK_TOKENS  # plan mode: prompt tokens the engine is fed at a time
    id_column: str | None = None
    skip_bad_rows: bool = False
    max_rejects: int = DEFAULT_MAX_REJECTS
    nulls: str = "error"
    truncate: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_rows: int = DEFAULT_CHECKPOINT_ROWS
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    restart: bool = False
    retry_errors: bool = False  # run again only the rows in error of a finished or checkpointed job
    keep_checkpoints: bool = False
    overwrite: bool = False  # replace an existing output file no batchllm job wrote
    summary: Path | None = None  # written by the CLI after the run; checked with every other path
    choices: str | None = None  # --choices A,B,C or @FILE
    regex: str | None = None
    json_schema: Path | None = None
    prompt: PromptOptions = PromptOptions()  # --var, --param, --system, --truncate-column
    reading: InputOptions = InputOptions()  # --input-glob, --input-format, --encoding, --where, --columns


def iso_utc(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, e.g. 2026-01-31T08:00:00.123Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _per_s(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else 0.0


@dataclass(frozen=True)
class AttemptCounts:
    """What this invocation did; rows committed by earlier attempts are not in it. Token identity:
    prefill_tokens = prompt_tokens - prefix_hit_tokens + shared_prefix_tokens + recomputed_tokens."""

    rows: int = 0  # rows finished (answered or failed)
    rows_ok: int = 0
    rows_failed: int = 0
    rows_truncated: int = 0  # prompts cut with --truncate
    prompt_tokens: int = 0  # prompt tokens of the rows the engine ran
    prefix_hit_tokens: int = 0  # of those, tokens whose KV was reused (shared prefix, cached block), not computed
    prefill_tokens: int = 0  # tokens computed in prefill, of every kind
    shared_prefix_tokens: int = 0  # of prefill_tokens: shared prefixes, each computed once (plan mode)
    recomputed_tokens: int = 0  # of prefill_tokens: recomputed after preemption, or of rows cut off unfinished
    unique_prompt_tokens: int = 0  # trie token count of the rows run (plan mode): the least prefill possible
    completion_tokens: int = 0
    preemptions: int = 0
    sharing_fallbacks: int = 0  # shared prefixes dropped because the KV cache could not hold them
    peak_kv_blocks: int = 0
    elapsed_s: float = 0.0  # generation: first row read to last result (model loading and writing apart)
    load_s: float = 0.0
    write_s: float = 0.0
    # plan mode (the whole table planned at once, fed to the engine in chunks: planned_feed)
    plan_chunks: int = 0
    plan_boundary_tokens: int = 0  # tokens computed again because a prefix spanned a chunk cut (0 normally)
    plan_out_of_core: bool = False  # the prompts were sorted on disk (memory was short)
    plan_s: float = 0.0  # tokenizing and sorting every row, before the engine's first chunk
    engine_wait_s: float = 0.0  # the engine idle, waiting for its next chunk

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("elapsed_s", "load_s", "write_s", "plan_s", "engine_wait_s"):
            data[key] = round(data[key], 3)
        # rates over the elapsed time as printed, so a reader dividing the printed numbers gets the same rate
        elapsed = data["elapsed_s"]
        data["rows_per_s"] = _per_s(self.rows, elapsed)
        data["prompt_tokens_per_s"] = _per_s(self.prompt_tokens, elapsed)
        data["output_tokens_per_s"] = _per_s(self.completion_tokens, elapsed)
        return data


@dataclass(frozen=True)
class JobCounts:
    """The whole job so far, rows committed by earlier (interrupted) attempts included."""

    rows_total: int = 0  # rows of the input (after --limit, rejected records left out)
    rows: int = 0  # rows done and committed
    rows_ok: int = 0
    rows_failed: int = 0
    rows_rejected: int = 0  # malformed CSV records skipped with --skip-bad-rows
    rows_resumed: int = 0  # rows committed before this attempt started
    prompt_tokens: int = 0
    completion_tokens: int = 0


def engine_summary(stats: Any, max_tokens: int) -> dict[str, Any]:
    """The summary's `engine` part from the last engine's stats (None: no engine ran, all zeros)."""
    return {
        "steps": getattr(stats, "steps", 0),
        "cuda_graph_steps": getattr(stats, "graph_steps", 0),
        "peak_kv_blocks": getattr(stats, "peak_kv_blocks", 0),
        "kv_blocks_total": getattr(stats, "kv_blocks_total", 0),
        "max_tokens": max_tokens,
    }


def finished_state(rows_failed: int, rows_rejected: int) -> str:
    return "finished_with_errors" if rows_failed or rows_rejected else "finished"


@dataclass(frozen=True)
class RunReport:
    """What one `run` invocation did, and where the job stands: the machine summary (`to_dict`) and
    the human rendering are both made from it. Also made for an interrupted or failed attempt, as far
    as it got (state interrupted or failed, with `error`)."""

    state: str  # finished | finished_with_errors | interrupted | failed
    exit_code: int
    started_at: float  # this invocation (Unix time)
    finished_at: float
    input: str
    output: str
    template: str | None = None
    model_dir: str | None = None
    demo_model: bool | None = None
    chat: bool | None = None
    prefix_sharing: str | None = None
    attempt: AttemptCounts = field(default_factory=AttemptCounts)
    job: JobCounts = field(default_factory=JobCounts)
    job_finished_at: float | None = None  # when the output was completed (this or an earlier attempt)
    model: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    first_errors: tuple[tuple[int, str], ...] = ()
    already_done: bool = False  # the job had finished before: nothing was done
    run_dir: str | None = None
    errors_file: str | None = None
    rejects_file: str | None = None
    marker: str | None = None
    error: str | None = None  # why an interrupted or failed attempt stopped
    workers: int = 1  # engine replicas this attempt ran on (--workers)
    scale_out: dict[str, Any] | None = None  # --workers: partition and per-worker counts (ray_run.py)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["attempt"] = self.attempt.to_dict()
        data["first_errors"] = [{"row": row, "error": err} for row, err in self.first_errors]
        for key in ("started_at", "finished_at"):
            data[key] = iso_utc(data[key])
        data["job"]["finished_at"] = iso_utc(data.pop("job_finished_at"))
        return data


@dataclass
class PreparedRun:
    """A validated invocation: everything except the model weights is loaded, the locks are held."""

    settings: RunSettings
    source: TableSource
    template: PromptTemplate
    columns: OutputColumns
    model_dir: Path
    demo_model: bool
    tokenizer: Tokenizer | None
    chat: bool
    params: SamplingParams
    engine_config: EngineConfig | None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    run_dir: RunDir | None = None
    committed: Committed = field(default_factory=Committed)
    total_rows: int = 0
    max_prompt_tokens: int = 0
    done_marker: Marker | None = None  # set when the job had already finished
    output_lock: FileLock | None = None
    constraint: Constraint | None = None  # structured output (--choices/--regex/--json-schema or the recipe's)
    typed_fields: list[TypedField] = field(default_factory=list)  # a schema's properties as typed columns
    # The model details of the finished job whose answers this run writes again (another --column,
    # --retry-errors): what the report and marker say when no engine loads because no row runs.
    earlier_model: dict[str, Any] = field(default_factory=dict)
    new_checkpoint: bool = False  # this run wrote the run directory's manifest (no earlier run's checkpoint)
    made_dirs: list[Path] = field(default_factory=list)  # the output's directories this run created

    def report_identity(self) -> dict[str, Any]:
        """The RunReport fields that name the job (the same whether it ran now or had finished)."""
        s = self.settings
        return dict(input=self.source.path, output=str(s.output), template=self.template.source.name,
                    model_dir=str(self.model_dir), demo_model=self.demo_model, chat=self.chat,
                    prefix_sharing=s.prefix_sharing)

    def prompt_encoder(self) -> PromptEncoder:
        """Rows -> token ids exactly as this run sends them to the engine."""
        s = self.settings
        assert self.tokenizer is not None
        return PromptEncoder(self.template, self.tokenizer, self.chat, self.max_prompt_tokens, s.truncate,
                             system=s.prompt.system, truncate_columns=s.prompt.truncate_columns,
                             decoders=self.source.json_decoders())

    def pending_batches(self, done: "np.ndarray") -> Iterator["pa.RecordBatch"]:
        """The input's batches with the rows marked in `done` (bool per row id) left out; batches with
        no row left are skipped."""
        for batch in self.source.batches(self.settings.batch_rows):
            todo = ~done[batch.column(ROW_ID).to_numpy()]
            if todo.all():
                yield batch
            elif todo.any():
                yield batch.filter(todo)

    def close(self) -> None:
        """Release the locks (run directory, then output) and the input; the output's directories this
        run created go too if they are left empty (a run that stopped before writing anything)."""
        if self.run_dir is not None:
            self.run_dir.unlock()
        if self.output_lock is not None:
            self.output_lock.release()
        remove_dirs(self.made_dirs)
        self.source.close()

