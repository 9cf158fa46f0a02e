"""The `batchllm` command: its `run` (parses flags, calls the job, renders its report), the other commands
registered from their modules (prompt_commands.py, info_commands.py), and `main`. No job logic lives here."""
from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import typer

from batchllm_cli import __version__
from batchllm_cli.command_common import fail, prompt_options_of
from batchllm_cli.errors import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    STATUS_EXIT_CODES_HELP,
    BatchLLMError,
    Interrupted,
    OutputError,
)
from batchllm_cli.fast_exit import exit_now
from batchllm_cli.help_format import SectionedHelpCommand
from batchllm_cli.info_commands import recipes_command, status_command
from batchllm_cli.input_options import ColumnsOpt, EncodingOpt, InputFormatOpt, InputGlobOpt, WhereOpt, input_options
from batchllm_cli.interrupts import JobInterrupted, SignalGuard
from batchllm_cli.job import execute_run
from batchllm_cli.job_types import DEFAULT_CHECKPOINT_ROWS, DEFAULT_CHECKPOINT_SECONDS, RunSettings
from batchllm_cli.planned_feed import DEFAULT_PLAN_CHUNK_TOKENS
from batchllm_cli.options import (
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
    IdColumnOpt,
    IgnoreEosOpt,
    InputArg,
    KeepCheckpointsOpt,
    OverwriteOpt,
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
    OutputOpt,
    RestartOpt,
    RetryErrorsOpt,
    SeedOpt,
    SkipBadRowsOpt,
    StopOpt,
    SummaryOpt,
    TemperatureOpt,
    TemplateOpt,
    TopKOpt,
    TopPOpt,
    TruncateOpt,
    ChoicesOpt,
    RegexOpt,
    JsonSchemaOpt,
    ParamOpt,
    SystemOpt,
    TruncateColumnOpt,
    VarOpt,
)
from batchllm_cli.prompt_commands import ANALYZE_EPILOG, RENDER_EPILOG, analyze_command, render_command
from batchllm_cli.progress import err_console, make_progress, print_error, print_event
from batchllm_cli.report_files import check_report_target
from batchllm_cli.report_render import render_report, stopped_summary, write_summary
from batchllm_cli.run_prepare import prepare_run
from batchllm_cli.std_streams import protect_std_streams, stdout_data
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS

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
        with stdout_data():
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
    overwrite: OverwriteOpt = False,
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
    as_json = log_format is LogFormat.json  # stderr is JSON lines throughout, errors and the end included
    prompt = prompt_options_of(var, param, system, truncate_column, as_json)
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
        overwrite=overwrite,
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
    guard.install()  # SIGINT/SIGTERM/SIGHUP: commit finished rows, then exit 130/143/129
    try:
        check_report_target(summary, "--summary")
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
            raise fail(error, as_json) from None
        raise
    finally:
        guard.restore()
    report = dataclasses.replace(report, started_at=started_at)  # the invocation's, preparation included
    if as_json:
        print_event("done", report.to_dict(), err_console)  # the --summary object, as one event
    else:
        render_report(report, err_console, settings)
    if summary is not None:
        try:
            write_summary(report, summary)
        except OSError as exc:
            raise fail(OutputError(f"Cannot write --summary {summary}: {exc.strerror or exc}."), as_json) from None
    raise typer.Exit(report.exit_code)


# The other commands live in their modules; registered here, in the order `batchllm --help` lists them.
app.command("analyze", epilog=ANALYZE_EPILOG, no_args_is_help=True, cls=SectionedHelpCommand)(analyze_command)
app.command("status", epilog=STATUS_EXIT_CODES_HELP, cls=SectionedHelpCommand)(status_command)
app.command("render", epilog=RENDER_EPILOG, no_args_is_help=True, cls=SectionedHelpCommand)(render_command)
app.command("recipes", cls=SectionedHelpCommand)(recipes_command)


def main() -> None:
    """Console entry point (`batchllm`)."""
    protect_std_streams()  # closed or broken stdout/stderr never change a command's outcome
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
