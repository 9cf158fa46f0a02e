"""The `batchllm` command: parses flags, calls the job, renders its report. No job logic lives here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

import recipes
from batchllm_cli import __version__
from batchllm_cli.errors import EXIT_USAGE, BatchLLMError, UsageError
from batchllm_cli.job import RunReport, RunSettings, execute_run, prepare_run
from batchllm_cli.options import (
    BlockSizeOpt,
    ChatOpt,
    ColumnOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    InputArg,
    KVCacheMemoryOpt,
    LimitOpt,
    MaxBatchTokensOpt,
    MaxTokensOpt,
    ModelOpt,
    OutputOpt,
    SeedOpt,
    StopOpt,
    SummaryOpt,
    TemperatureOpt,
    TemplateOpt,
    TopKOpt,
    TopPOpt,
)
from batchllm_cli.progress import err_console, make_progress, print_error

EXIT_CODES_EPILOG = (
    "Exit codes: 0 all rows done; 1 fatal error; 2 usage error (bad flag, missing input, unknown "
    "template variable, unusable model or output; found before the model loads); "
    "3 finished, but some rows are in error (see the *_error column)."
)

app = typer.Typer(
    name="batchllm",
    help="Run an LLM over every row of a table, offline, and write the answers back as new columns.",
    epilog=EXIT_CODES_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
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


def _check_summary_path(summary: str | None) -> None:
    if summary is None or summary == "-":
        return
    parent = Path(summary).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--summary: cannot write {summary} (no writable directory {parent}).")


def _render_report(report: RunReport, console: Console) -> None:
    failed = f", {report.rows_failed} failed" if report.rows_failed else ""
    console.print(
        f"done: {report.rows} rows ({report.rows_ok} ok{failed}) in {report.elapsed_s:.1f} s: "
        f"{report.rows_per_s:.2f} rows/s, {report.output_tokens_per_s:.1f} output tok/s "
        f"(model load {report.load_s:.1f} s, write {report.write_s:.1f} s)"
    )
    saved = report.prompt_tokens - report.prefill_tokens
    share = f" ({100.0 * saved / report.prompt_tokens:.0f}% of prompt tokens not recomputed)" if saved > 0 else ""
    console.print(
        f"tokens: {report.prompt_tokens} prompt, {report.prefill_tokens} prefilled{share}, "
        f"{report.completion_tokens} generated; {report.preemptions} preemptions"
    )
    console.print(Text(f"output: {report.output}"))
    for row, error in report.first_errors:
        console.print(Text(f"  row {row}: {error}", style="red"))
    if report.rows_failed > len(report.first_errors):
        console.print(f"  ... and {report.rows_failed - len(report.first_errors)} more (see the error column)")


def _write_summary(report: RunReport, summary: str) -> None:
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if summary == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(summary).write_text(text, encoding="utf-8")


def _fail(exc: BatchLLMError) -> typer.Exit:
    print_error(str(exc))
    return typer.Exit(exc.exit_code)


@app.command(epilog=EXIT_CODES_EPILOG, no_args_is_help=True)
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
    chat: ChatOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    kv_cache_memory: KVCacheMemoryOpt = None,
    max_batch_tokens: MaxBatchTokensOpt = None,
    block_size: BlockSizeOpt = None,
    summary: SummaryOpt = None,
) -> None:
    """Run the model over every row of INPUT and write OUTPUT = input columns + answer columns.

    Example: batchllm run examples/reviews.csv --template classify --output out/reviews.parquet
    """
    settings = RunSettings(
        input=input,
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
        chat=chat,
        limit=limit,
        device=device.value,
        dtype=dtype.value,
        kv_cache_memory=kv_cache_memory,
        max_batch_tokens=max_batch_tokens,
        block_size=block_size,
    )
    progress = make_progress(err_console)
    try:
        _check_summary_path(summary)
        prepared = prepare_run(settings, progress)
        try:
            report = execute_run(prepared, progress)
        finally:
            prepared.close()
    except BatchLLMError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        print_error("interrupted; no output was written.")
        raise typer.Exit(130) from None
    _render_report(report, err_console)
    if summary is not None:
        _write_summary(report, summary)
    raise typer.Exit(report.exit_code)


@app.command("recipes")
def list_recipes_command() -> None:
    """List the bundled prompt recipes (use a name as --template)."""
    rows: list[dict[str, Any]] = []
    for recipe in recipes.list_recipes():
        optional = ", ".join(f"[{name}]" for name in recipe.optional_columns)
        needs = ", ".join(list(recipe.required_columns) + ([optional] if optional else []))
        rows.append({"name": recipe.name, "description": recipe.description, "columns": needs})
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        # Plain stdout lines: this list is the command's output and should pipe cleanly.
        typer.echo(f"{r['name']:<{width}}  {r['description']} Columns: {r['columns']}.")


def main() -> None:
    """Console entry point (`batchllm`)."""
    try:
        app()
    except BatchLLMError as exc:  # raised outside a command body (should not happen); stay one line
        print_error(str(exc))
        sys.exit(exc.exit_code)


__all__ = ["app", "main", "EXIT_USAGE"]
