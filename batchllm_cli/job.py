"""The `run` job as a library call: settings in, RunReport out; the CLI only renders the report.

Everything that can be wrong with an invocation (input, template, output path, model directory,
settings, a checkpoint of a different job, another run holding the lock) is checked in `prepare_run`
(run_prepare.py) before any model weights load; `execute_run` here runs the rows. The engine is
imported lazily, so `batchllm --help` and `batchllm recipes` never pay for importing torch.

Runs are resumable: results are committed to shards in a run directory as rows finish (see
checkpoint.py), and the same command again skips every committed row. The final output is assembled
from the shards by DuckDB, renamed into place, and a completion marker is written last.
"""
from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, NoReturn

from batchllm_cli.engine_settings import engine_config_of
from batchllm_cli.errors import BatchLLMError, Interrupted, TempFailError, UsageError
from batchllm_cli.interrupts import JobInterrupted, SignalGuard, null_guard
from batchllm_cli.job_output import already_done_report, write_final
from batchllm_cli.job_report import AttemptTracker, model_info
from batchllm_cli.job_types import PreparedRun, RunObserver, RunReport, RunSettings, SilentObserver
from batchllm_cli.planned_feed import PlannedFeed, PlanStats
from batchllm_cli.prompts import FailedRow, fit_prompt
from batchllm_cli.run_prepare import discard_new_checkpoint, prepare_run
from batchllm_cli.shard_sink import ShardSink
from batchllm_cli.table_io import ROW_ID

if TYPE_CHECKING:
    from engine import EngineConfig, SamplingParams

# Out of GPU memory: retry this many times, halving the step's token budget each time, then exit 75.
OOM_RETRIES = 2


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or torch.OutOfMemoryError), or a RuntimeError saying "out of
    memory" (CUDA, cuBLAS); recognized without importing torch."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def execute_run(
    prepared: PreparedRun, observer: RunObserver | None = None, guard: SignalGuard | None = None
) -> RunReport:
    """Load the model, run every row not yet committed, write the output; the report says how it went.
    An exception that stops the attempt carries the attempt's report too (job_report.report_of)."""
    observer = observer or SilentObserver()
    guard = guard or null_guard()
    settings = prepared.settings
    if prepared.done_marker is not None:
        return already_done_report(prepared, time.time())
    if settings.workers is not None or settings.ray_address is not None:
        from batchllm_cli.ray_run import execute_ray_run

        return execute_ray_run(prepared, observer, guard)
    assert prepared.run_dir is not None
    committed = prepared.committed
    sink = ShardSink.for_run(prepared, guard)
    tracker = AttemptTracker(prepared, sink.collector)
    remaining = prepared.total_rows - committed.rows
    feed: PlannedFeed | None = None
    try:
        if remaining > 0:
            if settings.prefix_sharing == "plan":
                # the whole job is tokenized and sorted while the weights load
                feed = tracker.feed = PlannedFeed(prepared, committed.done, settings.plan_chunk_tokens).start()
            t0 = time.perf_counter()
            tracker.engine = _load_engine(prepared, prepared.engine_config, sink)
            tracker.load_s = time.perf_counter() - t0
            _note_decode_attention(tracker.engine, observer)
    except BaseException as exc:
        if feed is not None:
            feed.close()
            tracker.plan_stats.append(feed.stats)  # planned while the model loaded: plan_s says how long
        if isinstance(exc, UsageError):  # the same command would be refused again: nothing to resume
            discard_new_checkpoint(prepared)
        raise tracker.stopped(exc)
    first_feed = feed
    observer.start(prepared.total_rows, committed.rows, tracker.snapshot)
    tracker.begin_generation()
    try:
        batch_tokens = prepared.engine_config.max_batch_tokens if prepared.engine_config else 0
        attempt = 0
        while tracker.engine is not None:
            try:
                _generate(prepared, tracker.engine, sink, observer, tracker.plan_stats, feed)
                break
            except JobInterrupted:
                raise
            except BaseException as exc:
                feed = None  # closed by _generate; a retry plans the rows left again
                if not is_out_of_memory(exc):
                    raise
                sink.salvage()
                tracker.retire()
                from engine import release_accelerator_memory

                release_accelerator_memory()
                attempt += 1
                batch_tokens //= 2
                if attempt > OOM_RETRIES or batch_tokens < 16:
                    raise TempFailError(
                        f"Out of GPU memory ({' '.join(str(exc).split())[:200]}) after backing off "
                        f"{OOM_RETRIES} times. Finished rows are kept; run again with a smaller "
                        "--max-batch-tokens or --kv-cache-memory to resume."
                    ) from exc
                observer.notice(f"Out of GPU memory; retrying the remaining rows with --max-batch-tokens {batch_tokens}.")
                config = engine_config_of(settings, prepared.model_dir, max_batch_tokens=batch_tokens)
                tracker.engine = _load_engine(prepared, config, sink)
        sink.commit()
    except BaseException as exc:
        run_dir = prepared.run_dir.path
        raise_stopped(exc, guard, sink, tracker, lambda: (  # counted once the salvage has committed
            f"{sink.committed.rows} of {prepared.total_rows} rows are committed in "
            f"{run_dir}; run the same command again to resume."
        ))
    finally:
        if first_feed is not None:
            first_feed.close()  # closed already unless the run stopped before the engine pulled from it
        observer.finish()

    if not committed.done.all():
        missing = int((~committed.done).sum())
        raise tracker.stopped(BatchLLMError(
            f"Internal error: {missing} rows have no committed result; run the same command again."))

    return write_output(prepared, model_info(tracker.engine), guard, tracker)


def write_output(prepared: PreparedRun, model: dict[str, Any], guard: SignalGuard, tracker: Any) -> RunReport:
    """Every row is committed: write the output and the marker, and report (the tracker's `finished`);
    a signal while the output is being written stops the job as interrupted, the rows kept for the next
    run to write. Once the complete output is renamed into place the job has finished: a signal from
    then on is only remembered, and the run ends as finished (its marker written, exit 0)."""
    assert prepared.run_dir is not None
    t0 = time.perf_counter()

    def committing() -> None:
        guard.draining = True

    try:
        files = write_final(prepared, model or dict(prepared.earlier_model), committing)  # no engine: the finished job's
    except BaseException as exc:
        if isinstance(exc, JobInterrupted) or guard.pending is not None:
            guard.draining = True
            raise tracker.stopped(interrupted_by_signal(guard, exc, (
                f"all {prepared.total_rows} rows are committed in {prepared.run_dir.path}, the output is not "
                "written yet; run the same command again to write it."
            ))) from None
        raise tracker.stopped(exc)
    return tracker.finished(time.perf_counter() - t0, files)


def raise_stopped(exc: BaseException, guard: SignalGuard, sink: ShardSink, tracker: Any,
                  kept: Callable[[], str]) -> NoReturn:
    """End a run that `exc` stopped: results still buffered are committed (salvaged), and the report is
    interrupted (`kept()`, called after the salvage, says what the next run resumes from) or failed."""
    guard.draining = True
    sink.salvage()
    # A signal can also surface as another exception (DuckDB turns it into "Query interrupted").
    if isinstance(exc, JobInterrupted) or guard.pending is not None:
        raise tracker.stopped(interrupted_by_signal(guard, exc, kept())) from None
    raise tracker.stopped(exc)


def interrupted_by_signal(guard: SignalGuard, exc: BaseException, what: str) -> Interrupted:
    """The Interrupted outcome of a stop by signal (or by JobInterrupted raised in a worker), naming what was kept."""
    stop = exc if isinstance(exc, JobInterrupted) else JobInterrupted(guard.pending or signal.SIGINT)
    return Interrupted(f"Interrupted by {stop}: {what}", stop.exit_code)


def _note_decode_attention(engine: Any, observer: RunObserver) -> None:
    """A note when the compiled CPU decode attention could not serve (no compiler, a build that
    failed): the run is right but slower, which otherwise only the summary's model part would say."""
    path = getattr(engine.model_info, "decode_attention", "")
    if path.startswith("torch (") and "turned off by" not in path and "has no compiled" not in path:
        observer.notice(f"Decode attention runs as PyTorch ops, slower than the compiled CPU kernel: {path[7:-1]}.")


def _load_engine(prepared: PreparedRun, config: EngineConfig | None, sink: ShardSink) -> Any:
    from engine import ConfigError, LLMEngine, ModelLoadError

    assert config is not None
    try:
        return LLMEngine(config, tokenizer=prepared.tokenizer)
    except (ModelLoadError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc
    except BaseException as exc:
        if is_out_of_memory(exc):
            raise TempFailError(
                f"Out of GPU memory while loading the model ({' '.join(str(exc).split())[:200]}); free the "
                "GPU or lower --kv-cache-memory, then run the same command again."
            ) from exc
        raise


def _generate(
    prepared: PreparedRun, engine: Any, sink: ShardSink, observer: RunObserver, plan_stats: list[PlanStats],
    feed: PlannedFeed | None = None,
) -> None:
    """One pass of the engine over every row not yet committed: in plan mode in the order of one
    global plan of them all (`feed`, started already, or a new one; closed here), else in table order."""
    settings = prepared.settings
    assert prepared.tokenizer is not None
    encoder = prepared.prompt_encoder()
    done = sink.committed.done
    in_flight: dict[Hashable, tuple[int, bool]] = {}
    id_column = settings.id_column

    def fail(row_id: int, error: str, kind: str) -> None:
        sink.collector.add_failure(row_id, error, kind)
        observer.advance(1, 0)
        sink.maybe_commit()

    def requests() -> Iterator[tuple[Hashable, list[int], SamplingParams]]:
        # Pulled lazily by the engine; rows already committed are never rendered again, and rows whose
        # template fails (or whose prompt is too long) never reach it.
        for batch in prepared.pending_batches(done):
            keys = dict(zip(batch.column(ROW_ID).to_pylist(), batch.column(id_column).to_pylist())) if id_column else None
            for item in encoder.encode(batch):
                if isinstance(item, FailedRow):
                    fail(item.row_id, item.error, item.kind)
                    continue
                fitted = fit_prompt(item, prepared.max_prompt_tokens, settings.truncate)
                if isinstance(fitted, FailedRow):
                    fail(fitted.row_id, fitted.error, fitted.kind)
                    continue
                # The engine's random stream of a row is keyed by this value: the ordinal row id, or
                # the user's id, so a resumed run samples every row exactly as an uninterrupted one.
                key = keys[fitted.row_id] if keys is not None else fitted.row_id
                in_flight[key] = (fitted.row_id, fitted.truncated)
                yield key, fitted.token_ids, prepared.params

    if settings.prefix_sharing == "plan":
        feed = feed or PlannedFeed(prepared, done, settings.plan_chunk_tokens).start()
        try:
            results = engine.generate_planned(feed.chunks(lambda f: fail(f.row_id, f.error, f.kind), in_flight))
            collect_results(results, in_flight, sink, observer)
        finally:
            feed.close()
            plan_stats.append(feed.stats)
    else:
        collect_results(engine.generate(requests()), in_flight, sink, observer)


def collect_results(results: Iterator[Any], in_flight: dict[Hashable, tuple[int, bool]], sink: ShardSink,
             observer: RunObserver) -> None:
    from engine import EngineError

    try:
        for result in results:
            row_id, truncated = in_flight.pop(result.key)
            sink.collector.add_result(result, row_id, truncated)
            observer.advance(1, result.completion_tokens)
            sink.maybe_commit()
    except EngineError as exc:
        raise BatchLLMError(f"The engine stopped: {exc}") from exc


def run_job(settings: RunSettings, observer: RunObserver | None = None) -> RunReport:
    """prepare_run + execute_run: the whole job, for library callers."""
    prepared = prepare_run(settings, observer)
    try:
        return execute_run(prepared, observer)
    finally:
        prepared.close()
