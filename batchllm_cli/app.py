"""The `batchllm` command: parses flags, calls the job, renders its report. No job logic lives here."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

import recipes
from batchllm_cli import __version__
from batchllm_cli.command_common import fail, prompt_options_of
from batchllm_cli.errors import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    STATUS_EXIT_CODES_HELP,
    BatchLLMError,
    Interrupted,
    OutputError,
    UsageError,
)
from batchllm_cli.fast_exit import exit_now
from batchllm_cli.file_safety import JobPath, check_job_paths, input_reads, model_files
from batchllm_cli.help_format import SectionedHelpCommand
from batchllm_cli.input_options import ColumnsOpt, EncodingOpt, InputFormatOpt, InputGlobOpt, WhereOpt, input_options
from batchllm_cli.interrupts import JobInterrupted, SignalGuard
from batchllm_cli.job import execute_run
from batchllm_cli.job_types import DEFAULT_CHECKPOINT_ROWS, DEFAULT_CHECKPOINT_SECONDS, RunSettings
from batchllm_cli.planned_feed import DEFAULT_PLAN_CHUNK_TOKENS
from batchllm_cli.options import (
    AnalyzeJsonOpt,
    AttentionBackend,
    AttentionBackendOpt,
    BlockSizeOpt,
    ChatOpt,
    CheckpointDirOpt,
    PlanChunkTokensOpt,
    CheckpointRowsOpt,
    CheckpointSecondsOpt,
    ColumnOpt,
    CudaGraphsOpt,
    RayAddressOpt,
    WorkersOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    GpuMemoryUtilizationOpt,
    HtmlOpt,
    IdColumnOpt,
    IgnoreEosOpt,
    InputArg,
    KeepCheckpointsOpt,
    KVCacheMemoryOpt,
    KVCacheTokensOpt,
    LimitOpt,
    LogFormat,
    LogFormatOpt,
    MaxBatchTokensOpt,
    PrefixSharing,
    PrefixSharingOpt,
    QuietOpt,
    MaxRejectsOpt,
    MaxTokensOpt,
    ModelOpt,
    NullPolicy,
    NullsOpt,
    OutOfCoreOpt,
    OutputOpt,
    RestartOpt,
    RetryErrorsOpt,
    SeedOpt,
    SkipBadRowsOpt,
    StatusJsonOpt,
    StatusTargetArg,
    StopOpt,
    SummaryOpt,
    TemperatureOpt,
    TemplateOpt,
    TokenizerOpt,
    TopKOpt,
    TopOpt,
    TopPOpt,
    TruncateOpt,
    ChoicesOpt,
    RegexOpt,
    JsonSchemaOpt,
    ParamOpt,
    RecipeNameArg,
    RenderJsonOpt,
    SystemOpt,
    TruncateColumnOpt,
    VarOpt,
)
from batchllm_cli.progress import err_console, make_progress, print_error
from batchllm_cli.report_render import check_summary_path, render_report, stopped_summary, write_summary
from batchllm_cli.run_prepare import prepare_run
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS
from batchllm_cli.table_io.inputs import STDIN, input_args, resolve_input

EXIT_CODES_EPILOG = EXIT_CODES_HELP

app = typer.Typer(
    name="batchllm",
    help="Run an LLM over every row of a table, offline, and write the answers back as new columns.",
    epilog=EXIT_CODES_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain click help: typer's rich tables cut option names to fit the terminal (help_format.py).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"batchllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Show the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    """Run an LLM over every row of a table, offline, and write the answers back as new columns."""


@app.command(epilog=EXIT_CODES_EPILOG, no_args_is_help=True, cls=SectionedHelpCommand)
def run(
    input: InputArg,
    template: TemplateOpt,
    output: OutputOpt,
    model: ModelOpt = None,
    column: ColumnOpt = "response",
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = 0,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    chat: ChatOpt = None,
    limit: LimitOpt = None,
    input_glob: InputGlobOpt = False,
    input_format: InputFormatOpt = None,
    encoding: EncodingOpt = None,
    where: WhereOpt = None,
    columns: ColumnsOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    kv_cache_memory: KVCacheMemoryOpt = None,
    kv_cache_tokens: KVCacheTokensOpt = None,
    max_batch_tokens: MaxBatchTokensOpt = None,
    block_size: BlockSizeOpt = None,
    prefix_sharing: PrefixSharingOpt = PrefixSharing.plan,
    plan_chunk_tokens: PlanChunkTokensOpt = DEFAULT_PLAN_CHUNK_TOKENS,
    attention_backend: AttentionBackendOpt = AttentionBackend.auto,
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.9,
    cuda_graphs: CudaGraphsOpt = True,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    summary: SummaryOpt = None,
    id_column: IdColumnOpt = None,
    skip_bad_rows: SkipBadRowsOpt = False,
    max_rejects: MaxRejectsOpt = DEFAULT_MAX_REJECTS,
    nulls: NullsOpt = NullPolicy.error,
    truncate: TruncateOpt = None,
    checkpoint_dir: CheckpointDirOpt = None,
    checkpoint_rows: CheckpointRowsOpt = DEFAULT_CHECKPOINT_ROWS,
    checkpoint_seconds: CheckpointSecondsOpt = DEFAULT_CHECKPOINT_SECONDS,
    restart: RestartOpt = False,
    retry_errors: RetryErrorsOpt = False,
    keep_checkpoints: KeepCheckpointsOpt = False,
    choices: ChoicesOpt = None,
    regex: RegexOpt = None,
    json_schema: JsonSchemaOpt = None,
    var: VarOpt = None,
    param: ParamOpt = None,
    system: SystemOpt = None,
    truncate_column: TruncateColumnOpt = None,
    quiet: QuietOpt = False,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Run the model over every row of INPUT and write OUTPUT = input columns + answer columns.

    Example: batchllm run examples/reviews.csv --template classify --output out/reviews.parquet

    Finished rows are committed to a checkpoint as the run goes; if it is killed, the same command
    again resumes where it stopped, and once the job is finished it does nothing.
    """
    prompt = prompt_options_of(var, param, system, truncate_column)
    settings = RunSettings(
        input=tuple(input),
        reading=input_options(input_glob, input_format, encoding, where, columns),
        template=template,
        output=output,
        model=model,
        column=column,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
        chat=chat,
        limit=limit,
        device=device.value,
        dtype=dtype.value,
        kv_cache_memory=kv_cache_memory,
        kv_cache_tokens=kv_cache_tokens,
        max_batch_tokens=max_batch_tokens,
        block_size=block_size,
        prefix_sharing=prefix_sharing.value,
        plan_chunk_tokens=plan_chunk_tokens,
        attention_backend=attention_backend.value,
        gpu_memory_utilization=gpu_memory_utilization,
        cuda_graphs=cuda_graphs,
        workers=workers,
        ray_address=ray_address,
        id_column=id_column,
        skip_bad_rows=skip_bad_rows,
        max_rejects=max_rejects,
        nulls=nulls.value,
        truncate=truncate.value if truncate is not None else None,
        checkpoint_dir=checkpoint_dir,
        checkpoint_rows=checkpoint_rows,
        checkpoint_seconds=checkpoint_seconds,
        restart=restart,
        retry_errors=retry_errors,
        keep_checkpoints=keep_checkpoints,
        summary=Path(summary) if summary not in (None, "-") else None,
        choices=choices,
        regex=regex,
        json_schema=json_schema,
        prompt=prompt,
    )
    progress = make_progress(err_console, quiet=quiet, log_format=log_format.value)
    started_at = time.time()
    checked = False  # every path check passed: a --summary file may be written
    guard = SignalGuard()
    guard.install()  # SIGINT/SIGTERM: commit finished rows, then exit 130/143
    try:
        check_summary_path(summary)
        prepared = prepare_run(settings, progress)
        checked = True
        try:
            report = execute_run(prepared, progress, guard)
        finally:
            guard.draining = True  # releasing the locks must not be interrupted half-way
            prepared.close()
    except BaseException as exc:
        error: BatchLLMError | None = None
        if isinstance(exc, Interrupted):
            error = exc
        # A signal during preparation (DuckDB reports it as "Query interrupted", i.e. another error).
        elif guard.pending is not None or isinstance(exc, (JobInterrupted, KeyboardInterrupt)):
            stop = JobInterrupted(guard.pending or signal.SIGINT)
            error = Interrupted(f"Interrupted by {stop} before any row ran; nothing was committed.", stop.exit_code)
        elif isinstance(exc, BatchLLMError):
            error = exc
        if summary is not None:
            stopped_summary(settings, summary, started_at, exc, error, checked)
        if error is not None:
            raise fail(error) from None
        raise
    finally:
        guard.restore()
    report = dataclasses.replace(report, started_at=started_at)  # the invocation's, preparation included
    render_report(report, err_console)
    if summary is not None:
        try:
            write_summary(report, summary)
        except OSError as exc:
            raise fail(OutputError(f"Cannot write --summary {summary}: {exc.strerror or exc}.")) from None
    raise typer.Exit(report.exit_code)


ANALYZE_EPILOG = (
    "Exit codes: 0 report written (rows whose template fails or whose prompt does not fit are counted in "
    "it); 1 fatal error; 2 usage error (bad flag, missing or malformed input, unknown template variable, "
    "unusable model or tokenizer, report file not writable; found before any row is tokenized); 130/143 "
    "interrupted by SIGINT/SIGTERM (temporary files are removed, no report is written)."
)


@app.command("analyze", epilog=ANALYZE_EPILOG, no_args_is_help=True, cls=SectionedHelpCommand)
def analyze_command(
    input: InputArg,
    template: TemplateOpt,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    chat: ChatOpt = None,
    limit: LimitOpt = None,
    input_glob: InputGlobOpt = False,
    input_format: InputFormatOpt = None,
    encoding: EncodingOpt = None,
    where: WhereOpt = None,
    columns: ColumnsOpt = None,
    id_column: IdColumnOpt = None,
    skip_bad_rows: SkipBadRowsOpt = False,
    max_rejects: MaxRejectsOpt = DEFAULT_MAX_REJECTS,
    nulls: NullsOpt = NullPolicy.error,
    truncate: TruncateOpt = None,
    max_tokens: MaxTokensOpt = None,
    block_size: BlockSizeOpt = None,
    kv_cache_tokens: KVCacheTokensOpt = None,
    out_of_core: OutOfCoreOpt = None,
    top: TopOpt = 10,
    json_out: AnalyzeJsonOpt = None,
    html_out: HtmlOpt = None,
    choices: ChoicesOpt = None,
    regex: RegexOpt = None,
    json_schema: JsonSchemaOpt = None,
    var: VarOpt = None,
    param: ParamOpt = None,
    system: SystemOpt = None,
    truncate_column: TruncateColumnOpt = None,
) -> None:
    """Report how much prompt work the rows share and what batchllm saves, before any GPU time.

    Example: batchllm analyze examples/reviews.csv --template classify --html report.html

    Renders and tokenizes every row exactly as `run` would (no model weights are loaded), builds the
    global prefix tree, and compares the prefill tokens of no sharing, an LRU prefix cache in table
    order, BatchLLM's single-level plan, batchllm's plan and the optimum. The report goes to stdout,
    progress and notes to stderr.
    """
    from batchllm_cli.analyze import AnalyzeSettings, prepare_analyze, run_analyze
    from batchllm_cli.analyze_html import render_html
    from batchllm_cli.analyze_report import (
        AnalyzeProgress,
        check_report_path,
        render_text,
        report_json,
        write_report_file,
    )

    settings = AnalyzeSettings(
        input=tuple(input),
        reading=input_options(input_glob, input_format, encoding, where, columns),
        template=template,
        model=model,
        tokenizer=tokenizer,
        chat=chat,
        limit=limit,
        id_column=id_column,
        skip_bad_rows=skip_bad_rows,
        max_rejects=max_rejects,
        nulls=nulls.value,
        truncate=truncate.value if truncate is not None else None,
        max_tokens=max_tokens,
        block_size=block_size,
        kv_cache_tokens=kv_cache_tokens,
        top=top,
        out_of_core=out_of_core,
        choices=choices,
        regex=regex,
        json_schema=json_schema,
        prompt=prompt_options_of(var, param, system, truncate_column),
    )
    progress = AnalyzeProgress(err_console)
    guard = SignalGuard()
    guard.install()  # SIGINT/SIGTERM unwind the job, so its temporary token spool is removed
    try:
        check_report_path(json_out, "--json")
        check_report_path(str(html_out) if html_out is not None else None, "--html")
        _check_report_paths(settings, json_out, html_out)
        prepared = prepare_analyze(settings, progress)
        try:
            report = run_analyze(prepared, progress)
        finally:
            prepared.close()
        guard.draining = True  # from here on only the reports are written; let them finish
        # The report is the command's output (`> report.txt`), unless --json - or --html - takes stdout.
        machine_on_stdout = json_out == "-" or (html_out is not None and str(html_out) == "-")
        render_text(report, err_console if machine_on_stdout else Console(highlight=False, soft_wrap=True))
        if html_out is not None:
            write_report_file(str(html_out), render_html(report))
            err_console.print(Text(f"html: {html_out}"))
        if json_out is not None:
            write_report_file(json_out, report_json(report))
    except BaseException as exc:
        # A signal may also surface as another error (DuckDB reports it as "Query interrupted").
        if guard.pending is not None or isinstance(exc, (JobInterrupted, KeyboardInterrupt)):
            stop = JobInterrupted(guard.pending or signal.SIGINT)
            raise fail(Interrupted(f"Interrupted by {stop}; no report was written.", stop.exit_code)) from None
        if isinstance(exc, BatchLLMError):
            raise fail(exc) from None
        raise
    finally:
        guard.restore()


def _check_report_paths(settings: Any, json_out: str | None, html_out: Path | None) -> None:
    """analyze's report files must not overwrite its input, template, model files or each other."""
    stdin = STDIN in input_args(settings.input)
    reads = [] if stdin else input_reads(resolve_input(settings.input, settings.reading, None))
    if Path(settings.template).is_file():
        reads.append(JobPath("the template", Path(settings.template)))
    for directory in (settings.model, settings.tokenizer):
        if directory is not None:
            reads += model_files(directory)
    writes = [JobPath(flag, Path(p)) for flag, p in (("--json", json_out), ("--html", html_out))
              if p is not None and str(p) != "-"]
    check_job_paths(reads, writes)


@app.command("status", epilog=STATUS_EXIT_CODES_HELP, cls=SectionedHelpCommand)
def status_command(target: StatusTargetArg, as_json: StatusJsonOpt = False) -> None:
    """Show how far a run is: rows done of total, rows in error, speed and ETA, state.

    Reads the output's completion marker and checkpoint only (safe while the run is working). The exit
    code says the state, for scripts and sensors.
    """
    from batchllm_cli.status import format_status, read_status, status_json

    try:
        st = read_status(target)
    except BatchLLMError as exc:
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(status_json(st))
        sys.stdout.flush()
    else:
        typer.echo(format_status(st))
    raise typer.Exit(st.exit_code)


RENDER_EPILOG = (
    "Exit codes: 0 prompts printed (a row whose template fails or whose prompt does not fit is printed with "
    "its error); 1 fatal error; 2 usage error (bad flag, missing or malformed input, unknown template "
    "variable, unusable model or tokenizer; found before any row is rendered); 130 interrupted by Ctrl-C."
)


@app.command("render", epilog=RENDER_EPILOG, no_args_is_help=True, cls=SectionedHelpCommand)
def render_command(
    input: InputArg,
    template: TemplateOpt,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    chat: ChatOpt = None,
    limit: LimitOpt = None,
    input_glob: InputGlobOpt = False,
    input_format: InputFormatOpt = None,
    encoding: EncodingOpt = None,
    where: WhereOpt = None,
    columns: ColumnsOpt = None,
    id_column: IdColumnOpt = None,
    nulls: NullsOpt = NullPolicy.error,
    truncate: TruncateOpt = None,
    max_tokens: MaxTokensOpt = None,
    var: VarOpt = None,
    param: ParamOpt = None,
    system: SystemOpt = None,
    truncate_column: TruncateColumnOpt = None,
    as_json: RenderJsonOpt = False,
) -> None:
    """Print the prompts a run would send (chat template applied) and their token counts.

    Example: batchllm render examples/reviews.csv --template classify --limit 3

    Takes the same prompt options as `run` and `analyze`; loads the tokenizer and config.json only,
    never the model weights. Output goes to stdout, messages to stderr.
    """
    from batchllm_cli.analyze import AnalyzeSettings, prepare_analyze
    from batchllm_cli.analyze_report import AnalyzeProgress
    from batchllm_cli.render import render_rows

    settings = AnalyzeSettings(
        input=tuple(input),
        reading=input_options(input_glob, input_format, encoding, where, columns),
        template=template,
        model=model,
        tokenizer=tokenizer,
        chat=chat,
        limit=limit,
        id_column=id_column,
        nulls=nulls.value,
        truncate=truncate.value if truncate is not None else None,
        max_tokens=max_tokens,
        prompt=prompt_options_of(var, param, system, truncate_column),
    )
    try:
        prepared = prepare_analyze(settings, AnalyzeProgress(err_console))
        try:
            with_id = id_column is not None
            for row in render_rows(prepared):
                sys.stdout.write(row.to_json(with_id) + "\n" if as_json else row.to_text(with_id))
            sys.stdout.flush()
        finally:
            prepared.close()
    except BatchLLMError as exc:
        raise fail(exc) from None
    except BrokenPipeError:  # `batchllm render ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command("recipes", cls=SectionedHelpCommand)
def recipes_command(name: RecipeNameArg = None) -> None:
    """List the bundled prompt recipes (use a name as --template), or print one: recipes NAME."""
    if name is not None:
        try:
            recipe = recipes.load_recipe(name)
        except LookupError:
            raise fail(UsageError(
                f"No recipe {name!r}; recipes: {', '.join(recipes.recipe_names())}."
            )) from None
        typer.echo(_describe_recipe(recipe))
        return
    rows: list[dict[str, Any]] = []
    for recipe in recipes.list_recipes():
        optional = ", ".join(f"[{name}]" for name in recipe.optional_columns)
        needs = ", ".join(list(recipe.required_columns) + ([optional] if optional else []))
        rows.append({"name": recipe.name, "description": recipe.description, "columns": needs})
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        # Plain stdout lines: this list is the command's output and should pipe cleanly.
        typer.echo(f"{r['name']:<{width}}  {r['description']} Columns: {r['columns']}.")


def _describe_recipe(recipe: recipes.Recipe) -> str:
    lines = [f"{recipe.name}: {recipe.description}", "variables:"]
    lines += [f"  {var}: {what} (required)" for var, what in recipe.required_columns.items()]
    lines += [f"  {var}: {what} (optional)" for var, what in recipe.optional_columns.items()]
    lines.append("  (a column of that name, or --var NAME=COLUMN for another column, or -p NAME=VALUE for a constant)")
    lines.append(f"max tokens: {recipe.max_tokens} (default of --max-tokens)")
    if recipe.choices:
        lines.append(f"choices: {', '.join(recipe.choices)} (default of --choices)")
    if recipe.json_schema is not None:
        lines.append(f"json schema (default of --json-schema): {json.dumps(recipe.json_schema, ensure_ascii=False)}")
    lines += ["template:", recipe.text.rstrip("\n")]
    return "\n".join(lines)


def main() -> None:
    """Console entry point (`batchllm`)."""
    try:
        app()
    except BatchLLMError as exc:  # raised outside a command body (should not happen); stay one line
        print_error(str(exc))
        exit_now(exc.exit_code)
    except SystemExit as exc:  # how the command ends, whatever its outcome
        if exc.code is None or isinstance(exc.code, int):
            exit_now(exc.code or 0)
        raise


__all__ = ["app", "main", "EXIT_USAGE"]
