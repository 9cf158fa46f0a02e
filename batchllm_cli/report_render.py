"""A run's report as the `run` command hands it out: the human lines on stderr, and the --summary JSON
line (stdout or a file) of a run that finished or stopped."""
from __future__ import annotations

import dataclasses
import json
import time

from rich.console import Console
from rich.text import Text

from batchllm_cli.errors import EXIT_INTERNAL, BatchLLMError, Interrupted
from batchllm_cli.job_report import report_of
from batchllm_cli.job_types import RunReport, RunSettings
from batchllm_cli.report_files import write_report


def _kv_cache_limit(report: RunReport, settings: RunSettings | None) -> str:
    """The option that sized the KV cache: --kv-cache-tokens when its cap gave each engine its blocks."""
    tokens = settings.kv_cache_tokens if settings is not None else None
    if tokens is None or settings is None:
        return "--kv-cache-memory"
    from engine import EngineConfig

    block_size = settings.block_size or EngineConfig.block_size  # the engine's default when not given
    capped = -(-tokens // block_size) * report.workers == report.engine.get("kv_blocks_total")
    return "--kv-cache-tokens" if capped else "--kv-cache-memory"


def render_report(report: RunReport, console: Console, settings: RunSettings | None = None) -> None:
    """`settings`: the run's, to name in advice the option that set a limit the run met."""
    job, att = report.job, report.attempt
    if report.already_done:
        failed = f", {job.rows_failed} in error" if job.rows_failed else ""
        console.print(Text(
            f"already finished: {report.output} has all {job.rows} rows{failed} "
            f"(marker {report.marker}); nothing to do."
        ))
        return
    failed = f", {job.rows_failed} failed" if job.rows_failed else ""
    rates = att.to_dict()
    console.print(
        f"done: {job.rows} rows ({job.rows_ok} ok{failed}); this run: {att.rows} rows in {att.elapsed_s:.1f} s, "
        f"{rates['rows_per_s']:.2f} rows/s, {rates['prompt_tokens_per_s']:.0f} prompt tok/s, "
        f"{rates['output_tokens_per_s']:.1f} output tok/s (model load {att.load_s:.1f} s, write {att.write_s:.1f} s)"
    )
    # Every count here is this run's: rows resumed from a checkpoint cost nothing now.
    saved = att.prompt_tokens - att.prefill_tokens
    share = f"; {100.0 * saved / att.prompt_tokens:.0f}% less prefill than the prompts" if saved > 0 else ""
    extra = [f"{n} {what}" for n, what in ((att.shared_prefix_tokens, "for shared prefixes"),
                                            (att.recomputed_tokens, "recomputed")) if n]
    console.print(
        f"tokens: {att.prompt_tokens} prompt ({att.prefix_hit_tokens} reused), {att.prefill_tokens} prefilled"
        f"{' (' + ', '.join(extra) + ')' if extra else ''}{share}, {att.completion_tokens} generated; "
        f"{att.preemptions} preemptions"
    )
    optimum = f", least possible {att.unique_prompt_tokens}" if att.unique_prompt_tokens else ""
    fallbacks = (
        f"; {att.sharing_fallbacks} shared prefixes dropped for lack of KV memory "
        f"(raise {_kv_cache_limit(report, settings)})" if att.sharing_fallbacks else ""
    )
    console.print(
        f"prefix sharing ({report.prefix_sharing}): {att.prefix_hit_tokens} prompt tokens reused{optimum}; "
        f"peak KV blocks {att.peak_kv_blocks}{fallbacks}"
    )
    if att.plan_chunks:
        where = "on disk" if att.plan_out_of_core else "in memory"
        console.print(
            f"global plan: sorted {where} in {att.plan_s:.1f} s, fed in {att.plan_chunks} "
            f"chunk{'s' if att.plan_chunks != 1 else ''} "
            f"({att.plan_boundary_tokens} tokens computed again at chunk cuts); engine waited "
            f"{att.engine_wait_s:.2f} s for work"
        )
    if report.scale_out is not None:
        so, part = report.scale_out, report.scale_out["partition"] or {}
        per = ", ".join(f"{w['rows']} rows in {w['engine_s']:.1f} s" for w in so["per_worker"])
        console.print(
            f"workers: {report.workers} ({per}); partition by prefix group: work balance "
            f"{part.get('balance', 1.0):.2f} (largest / mean), {part.get('split_groups', 0)} group(s) split; "
            f"{so['worker_failures']} worker failure(s)"
        )
    if job.rows_resumed:
        console.print(f"resumed: {job.rows_resumed} rows came from the checkpoint of an earlier run "
                      "(the counts of this run leave them out)")
    if att.rows_truncated:
        console.print(f"truncated: {att.rows_truncated} prompts were cut to fit the model's context")
    console.print(Text(f"output: {report.output}"))
    if report.rejects_file:
        console.print(Text(f"rejected: {job.rows_rejected} malformed input records (exit 3), "
                           f"see {report.rejects_file}"))
    for row, error in report.first_errors:
        console.print(Text(f"  row {row}: {error}", style="red"))
    if att.rows_failed > len(report.first_errors):
        more = att.rows_failed - len(report.first_errors)
        console.print(Text(f"  ... and {more} more (see the error column and {report.errors_file})"))


def write_summary(report: RunReport, summary: str) -> None:
    """One line of JSON: `| tail -1` in a script or Airflow's XCom gets all of it. Raises OSError."""
    write_report(summary, json.dumps(report.to_dict(), ensure_ascii=False) + "\n")


def stopped_summary(settings: RunSettings, summary: str, started_at: float, exc: BaseException,
                     error: BatchLLMError | None, checked: bool) -> None:
    """The summary of a run that stopped: the job's report when it made one, else what is known. A
    summary file is written only once every path check has passed (it may name the input)."""
    if summary != "-" and not checked:
        return
    report = report_of(exc) or (report_of(error) if error is not None else None)
    if report is not None:
        report = dataclasses.replace(report, started_at=started_at)  # the invocation's, preparation included
    else:
        exit_code = error.exit_code if error is not None else EXIT_INTERNAL
        report = RunReport(
            state="interrupted" if isinstance(error, Interrupted) else "failed", exit_code=exit_code,
            started_at=started_at, finished_at=time.time(), input=_input_label(settings.input),
            output=str(settings.output), template=settings.template, prefix_sharing=settings.prefix_sharing,
            error=" ".join(str(error or exc).split()) or type(exc).__name__,
        )
    try:
        write_summary(report, summary)
    except OSError:
        pass  # the error that stopped the run is the one to report


def _input_label(inp: object) -> str:
    """INPUT as a finished run's summary names it: its arguments joined by spaces (not a tuple's repr)."""
    return " ".join(map(str, inp)) if isinstance(inp, (tuple, list)) else str(inp)
