"""The `analyze` and `render` commands: they read the rows and render and tokenize their prompts exactly
as `run` would, without loading model weights (analyze.py, render.py do the work, imported when the
command runs)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from batchllm_cli.command_common import fail, prompt_options_of
from batchllm_cli.errors import BatchLLMError, Interrupted, UsageError
from batchllm_cli.file_safety import JobPath, check_job_paths, files_read, input_reads
from batchllm_cli.input_options import ColumnsOpt, EncodingOpt, InputFormatOpt, InputGlobOpt, WhereOpt, input_options
from batchllm_cli.interrupts import JobInterrupted, SignalGuard
from batchllm_cli.options import (
    AnalyzeJsonOpt,
    BlockSizeOpt,
    ChatOpt,
    ChoicesOpt,
    HtmlOpt,
    IdColumnOpt,
    InputArg,
    JsonSchemaOpt,
    KVCacheTokensOpt,
    LimitOpt,
    MaxRejectsOpt,
    MaxTokensOpt,
    ModelOpt,
    NullPolicy,
    NullsOpt,
    OutOfCoreOpt,
    ParamOpt,
    RegexOpt,
    RenderJsonOpt,
    SkipBadRowsOpt,
    SystemOpt,
    TemplateOpt,
    TokenizerOpt,
    TopOpt,
    TruncateColumnOpt,
    TruncateOpt,
    VarOpt,
)
from batchllm_cli.progress import err_console, print_notice
from batchllm_cli.std_streams import DataConsole, stdout_data
from batchllm_cli.table_io import DEFAULT_MAX_REJECTS
from batchllm_cli.table_io.inputs import STDIN, input_args, resolve_input


ANALYZE_EPILOG = (
    "Exit codes: 0 report written (rows whose template fails or whose prompt does not fit are counted in "
    "it); 1 fatal error; 2 usage error (bad flag, missing or malformed input, unknown template variable, "
    "unusable model or tokenizer, report file not writable; found before any row is tokenized); 129/130/143 "
    "interrupted by SIGHUP/SIGINT/SIGTERM (temporary files are removed, no report is written)."
)


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
    from batchllm_cli.report_files import check_report_target
    from batchllm_cli.analyze_report import (
        AnalyzeProgress,
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
        check_report_target(json_out, "--json")
        check_report_target(str(html_out) if html_out is not None else None, "--html")
        _check_report_paths(settings, json_out, html_out)
        prepared = prepare_analyze(settings, progress)
        try:
            report = run_analyze(prepared, progress)
        finally:
            prepared.close()
        guard.draining = True  # from here on only the reports are written; let them finish
        # The report is the command's output (`> report.txt`), unless --json - or --html - takes stdout.
        machine_on_stdout = json_out == "-" or (html_out is not None and str(html_out) == "-")
        with stdout_data():  # `analyze ... | head`: the reader has all it wanted; --html/--json still follow
            render_text(report, err_console if machine_on_stdout else DataConsole(highlight=False, soft_wrap=True))
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
    """analyze's report files must not overwrite a file it reads (files_read, as `run` checks them) or
    each other."""
    if json_out == "-" and html_out is not None and str(html_out) == "-":
        raise UsageError("--json - and --html - would both write to stdout, mixing the two reports; send one of "
                         "them to a file.")
    stdin = STDIN in input_args(settings.input)
    reads = [] if stdin else input_reads(resolve_input(settings.input, settings.reading, None))
    reads += files_read(settings, (settings.model, settings.tokenizer))
    writes = [JobPath(flag, Path(p)) for flag, p in (("--json", json_out), ("--html", html_out))
              if p is not None and str(p) != "-"]
    check_job_paths(reads, writes)


RENDER_EPILOG = (
    "Exit codes: 0 prompts printed (a row whose template fails or whose prompt does not fit is printed with "
    "its error); 1 fatal error; 2 usage error (bad flag, missing or malformed input, unknown template "
    "variable, unusable model or tokenizer; found before any row is rendered); 130 interrupted by Ctrl-C."
)


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
    skip_bad_rows: SkipBadRowsOpt = False,
    max_rejects: MaxRejectsOpt = DEFAULT_MAX_REJECTS,
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
        skip_bad_rows=skip_bad_rows,  # (a malformed CSV's error suggests it: render must take it too)
        max_rejects=max_rejects,
        nulls=nulls.value,
        truncate=truncate.value if truncate is not None else None,
        max_tokens=max_tokens,
        prompt=prompt_options_of(var, param, system, truncate_column),
    )
    try:
        prepared = prepare_analyze(settings, AnalyzeProgress(err_console))
        try:
            rejects = prepared.source.rejects
            if rejects is not None and rejects.num_rows:
                first = rejects.slice(0, 1).to_pylist()[0]
                print_notice(f"--skip-bad-rows: {rejects.num_rows} malformed record(s) are left out (the first on "
                             f"line {first['line']}: {first['error']}); `run` lists them in OUT.rejects.jsonl.",
                             err_console)
            with_id = id_column is not None
            with stdout_data():  # `batchllm render ... | head`: the reader has all it wanted
                for row in render_rows(prepared):
                    sys.stdout.write(row.to_json(with_id) + "\n" if as_json else row.to_text(with_id))
                sys.stdout.flush()
        finally:
            prepared.close()
    except BatchLLMError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
