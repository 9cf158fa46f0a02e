"""The `run` job as a library call: settings in, RunReport out; the CLI only renders the report.

Everything that can be wrong with an invocation (input, template, output path, model directory,
settings) is checked in `prepare_run` before any model weights load. The engine is imported lazily,
so `batchllm --help` and `batchllm recipes` never pay for importing torch.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from batchllm_cli.collector import OutputColumns, ResultCollector
from batchllm_cli.errors import EXIT_OK, EXIT_ROWS_FAILED, BatchLLMError, UsageError
from batchllm_cli.prompts import FailedRow, PromptEncoder, iter_prompts
from batchllm_cli.table_io import TableSource, check_output_path, write_output
from batchllm_cli.templates import PromptTemplate, resolve_template

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 256
DEMO_NOTICE = (
    "No --model given: using the built-in demo model ({path}). It has random weights, so its answers "
    "are gibberish; pass --model DIR (a Hugging Face model directory) for real answers."
)


class RunObserver(Protocol):
    """What the job tells its caller while it runs (the CLI draws progress from this)."""

    def notice(self, message: str) -> None: ...

    def start(self, total_rows: int) -> None: ...

    def advance(self, rows: int, completion_tokens: int) -> None: ...

    def finish(self) -> None: ...


class _SilentObserver:
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

    input: Path
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
    chat: bool | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: int | None = None
    max_batch_tokens: int | None = None
    block_size: int | None = None
    batch_rows: int = 1024  # rows rendered and tokenized per step of the input stream


@dataclass(frozen=True)
class RunReport:
    """What a finished run did. `elapsed_s` is the generation phase (first row read to last result);
    model loading and output writing are reported separately."""

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
    model: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    first_errors: tuple[tuple[int, str], ...] = ()

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_ROWS_FAILED if self.rows_failed else EXIT_OK

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
    """A validated invocation: everything except the model weights is loaded."""

    settings: RunSettings
    source: TableSource
    template: PromptTemplate
    columns: OutputColumns
    model_dir: Path
    demo_model: bool
    tokenizer: Tokenizer
    chat: bool
    params: SamplingParams
    engine_config: EngineConfig

    def close(self) -> None:
        self.source.close()


def _check_model_dir(path: Path) -> None:
    # The cheap checks a user gets wrong most often, before transformers or torch get involved.
    if not path.exists():
        raise UsageError(f"Model directory not found: {path}")
    if not path.is_dir():
        raise UsageError(f"--model must be a model directory, not a file: {path}")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json; --model needs a Hugging Face model directory.")


def resolve_model(model: Path | None, observer: RunObserver) -> tuple[Path, bool]:
    """The model directory to use and whether it is the random-weight demo model."""
    if model is not None:
        _check_model_dir(model)
        return model, False
    from engine.demo_model import ensure_demo_model

    path = ensure_demo_model()
    observer.notice(DEMO_NOTICE.format(path=path))
    return path, True


def load_tokenizer(model_dir: Path) -> Tokenizer:
    from engine.errors import EngineError
    from engine.tokenizer import Tokenizer

    try:
        return Tokenizer(model_dir)
    except EngineError as exc:
        raise UsageError(str(exc)) from exc


def resolve_chat(requested: bool | None, tokenizer: Tokenizer, model_dir: Path) -> bool:
    if requested is None:
        return tokenizer.has_chat_template
    if requested and not tokenizer.has_chat_template:
        raise UsageError(f"--chat: the model in {model_dir} has no chat template; use --no-chat.")
    return requested


def prepare_run(settings: RunSettings, observer: RunObserver | None = None) -> PreparedRun:
    """Validate the whole invocation; raises UsageError (exit 2) before any weights load."""
    observer = observer or _SilentObserver()
    source = TableSource(settings.input, limit=settings.limit)
    try:
        check_output_path(settings.output, settings.input)
        template = PromptTemplate(resolve_template(settings.template))
        template.check_columns(source.column_names)
        columns = OutputColumns(settings.column)
        if not settings.column:
            raise UsageError("--column must not be empty.")
        clash = [name for name in columns.names if name in source.column_names]
        if clash:
            raise UsageError(
                f"Output column(s) {', '.join(clash)} already exist in the input; pick another --column."
            )
        params = _sampling_params(settings, template)
        model_dir, demo = resolve_model(settings.model, observer)
        engine_config = _engine_config(settings, model_dir)
        tokenizer = load_tokenizer(model_dir)
        chat = resolve_chat(settings.chat, tokenizer, model_dir)
    except BaseException:
        source.close()
        raise
    return PreparedRun(settings, source, template, columns, model_dir, demo, tokenizer, chat, params, engine_config)


def _sampling_params(settings: RunSettings, template: PromptTemplate) -> SamplingParams:
    from engine.sampling_params import SamplingParams

    recipe = template.source.recipe
    max_tokens = settings.max_tokens
    if max_tokens is None:
        max_tokens = recipe.max_tokens if recipe is not None else DEFAULT_MAX_TOKENS
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            stop=tuple(settings.stop),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _engine_config(settings: RunSettings, model_dir: Path) -> EngineConfig:
    from engine.config import EngineConfig

    optional = {
        "kv_cache_memory": settings.kv_cache_memory,
        "max_batch_tokens": settings.max_batch_tokens,
        "block_size": settings.block_size,
    }
    try:
        return EngineConfig(
            model_dir=str(model_dir),
            device=settings.device,  # type: ignore[arg-type]  # validated by the CLI's choices
            dtype=settings.dtype,  # type: ignore[arg-type]
            **{k: v for k, v in optional.items() if v is not None},
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def execute_run(prepared: PreparedRun, observer: RunObserver | None = None) -> RunReport:
    """Load the model, stream every row through it, write the output; the report says how it went."""
    from engine.errors import ConfigError, EngineError, ModelLoadError
    from engine.llm_engine import LLMEngine

    observer = observer or _SilentObserver()
    settings = prepared.settings
    t0 = time.perf_counter()
    try:
        engine = LLMEngine(prepared.engine_config, tokenizer=prepared.tokenizer)
    except (ModelLoadError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc
    load_s = time.perf_counter() - t0

    collector = ResultCollector(prepared.columns)
    encoder = PromptEncoder(prepared.template, prepared.tokenizer, prepared.chat)

    def requests() -> Iterator[tuple[int, list[int], SamplingParams]]:
        # Pulled lazily by the engine; rows whose template fails never reach it.
        for item in iter_prompts(prepared.source, encoder, settings.batch_rows):
            if isinstance(item, FailedRow):
                collector.add_failure(item.row_id, item.error)
                observer.advance(1, 0)
            else:
                yield item.row_id, item.token_ids, prepared.params

    observer.start(prepared.source.count_rows())
    t1 = time.perf_counter()
    try:
        for result in engine.generate(requests()):
            collector.add_result(result)
            observer.advance(1, result.completion_tokens)
    except EngineError as exc:
        raise BatchLLMError(f"The engine stopped: {exc}") from exc
    finally:
        observer.finish()
    elapsed_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    write_output(prepared.source, collector.to_arrow(), settings.output)
    write_s = time.perf_counter() - t2

    stats = engine.stats()
    model_info = dataclasses.asdict(engine.model_info) if dataclasses.is_dataclass(engine.model_info) else {}
    return RunReport(
        input=str(settings.input),
        output=str(settings.output),
        template=prepared.template.source.name,
        model_dir=str(prepared.model_dir),
        demo_model=prepared.demo_model,
        chat=prepared.chat,
        rows=collector.rows,
        rows_ok=collector.rows_ok,
        rows_failed=collector.rows_failed,
        prompt_tokens=collector.prompt_tokens,
        prefill_tokens=stats.prefill_tokens,
        completion_tokens=collector.completion_tokens,
        preemptions=stats.preemptions,
        elapsed_s=elapsed_s,
        load_s=load_s,
        write_s=write_s,
        model=model_info,
        engine={
            "steps": stats.steps,
            "peak_kv_blocks": stats.peak_kv_blocks,
            "kv_blocks_total": stats.kv_blocks_total,
            "max_tokens": prepared.params.max_tokens,
        },
        first_errors=tuple(collector.first_errors),
    )


def run_job(settings: RunSettings, observer: RunObserver | None = None) -> RunReport:
    """prepare_run + execute_run: the whole job, for library callers."""
    prepared = prepare_run(settings, observer)
    try:
        return execute_run(prepared, observer)
    finally:
        prepared.close()
