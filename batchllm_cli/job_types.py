"""The `run` job's settings, report, observer and validated invocation (plain data)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batchllm_cli.checkpoint import Committed, FileLock, RunDir
from batchllm_cli.collector import OutputColumns
from batchllm_cli.errors import EXIT_OK, EXIT_ROWS_FAILED
from batchllm_cli.marker import Marker
from batchllm_cli.structured_output import Constraint, TypedField
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS, InputOptions, TableSource
from batchllm_cli.templates import PromptTemplate

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer

DEFAULT_CHECKPOINT_ROWS = 1000
DEFAULT_CHECKPOINT_SECONDS = 60.0


class RunObserver(Protocol):
    """What the job tells its caller while it runs (the CLI draws progress from this)."""

    def notice(self, message: str) -> None: ...

    def start(self, total_rows: int) -> None: ...

    def advance(self, rows: int, completion_tokens: int) -> None: ...

    def finish(self) -> None: ...


class SilentObserver:
    def notice(self, message: str) -> None:
        pass

    def start(self, total_rows: int) -> None:
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
    batch_rows: int = 1024  # rows rendered and tokenized per step of the input stream
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
    summary: Path | None = None  # written by the CLI after the run; checked with every other path
    choices: str | None = None  # --choices A,B,C or @FILE
    regex: str | None = None
    json_schema: Path | None = None
    reading: InputOptions = InputOptions()  # --input-glob, --input-format, --encoding, --where, --columns


@dataclass(frozen=True)
class RunReport:
    """What a finished run did. `elapsed_s` is the generation phase (first row read to last result);
    model loading and output writing are reported separately. Row counts cover the whole job (rows
    committed by earlier, interrupted runs included); token counts from the engine cover this run."""

    input: str
    output: str
    template: str
    model_dir: str
    demo_model: bool
    chat: bool
    rows: int
    rows_ok: int
    rows_failed: int
    prompt_tokens: int
    prefill_tokens: int
    completion_tokens: int
    preemptions: int
    elapsed_s: float
    load_s: float
    write_s: float
    prefix_sharing: str = "plan"
    unique_prompt_tokens: int = 0  # trie token count of the rows run (plan mode): the least prefill possible
    prefix_hit_tokens: int = 0  # prompt tokens whose KV was reused instead of computed
    peak_kv_blocks: int = 0
    sharing_fallbacks: int = 0  # shared prefixes dropped because the KV cache could not hold them
    model: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    first_errors: tuple[tuple[int, str], ...] = ()
    rows_resumed: int = 0  # rows committed by earlier runs of this job
    rows_rejected: int = 0  # malformed CSV records skipped with --skip-bad-rows (any: exit 3)
    rows_truncated: int = 0  # prompts cut with --truncate (this run)
    already_done: bool = False  # the job had finished before: nothing was done
    run_dir: str = ""
    errors_file: str | None = None
    rejects_file: str | None = None
    marker: str = ""

    @property
    def rows_per_s(self) -> float:
        done_now = self.rows - self.rows_resumed
        return done_now / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.already_done:
            return EXIT_OK
        return EXIT_ROWS_FAILED if self.rows_failed or self.rows_rejected else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["first_errors"] = [{"row": row, "error": err} for row, err in self.first_errors]
        data["rows_per_s"] = round(self.rows_per_s, 3)
        data["output_tokens_per_s"] = round(self.output_tokens_per_s, 3)
        for key in ("elapsed_s", "load_s", "write_s"):
            data[key] = round(data[key], 3)
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

    def report_identity(self) -> dict[str, Any]:
        """The RunReport fields that name the job (the same whether it ran now or had finished)."""
        s = self.settings
        return dict(input=self.source.path, output=str(s.output), template=self.template.source.name,
                    model_dir=str(self.model_dir), demo_model=self.demo_model, chat=self.chat)

    def close(self) -> None:
        """Release the locks (run directory, then output) and the input."""
        if self.run_dir is not None:
            self.run_dir.unlock()
        if self.output_lock is not None:
            self.output_lock.release()
        self.source.close()

