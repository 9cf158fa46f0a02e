"""The report of one `run` attempt: its counters while it runs (what progress reads) and the RunReport
it ends with, finished, interrupted or failed. Rows resumed from a checkpoint are the job's, never the
attempt's: they cost nothing now, so they stay out of its token counts and rates."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from batchllm_cli.collector import ResultCollector
from batchllm_cli.errors import EXIT_INTERNAL, EXIT_OK, EXIT_ROWS_FAILED, EXIT_SIGINT, BatchLLMError, Interrupted
from batchllm_cli.interrupts import JobInterrupted
from batchllm_cli.job_output import rejected_rows
from batchllm_cli.planned_feed import PlanStats
from batchllm_cli.job_types import (
    AttemptCounts,
    JobCounts,
    PreparedRun,
    RunReport,
    WorkDone,
    engine_summary,
    finished_state,
)

_REPORT_ATTR = "batchllm_report"


def report_of(exc: BaseException) -> RunReport | None:
    """The report of the attempt that `exc` stopped (interrupted or failed), if the job made one."""
    report = getattr(exc, _REPORT_ATTR, None)
    return report if isinstance(report, RunReport) else None


def job_counts(prepared: PreparedRun, resumed: int, shards: list[dict[str, int]] | None = None) -> JobCounts:
    """The whole job's counts from its committed shards: the run's own view (`prepared.committed`), or
    `shards` as commit records give them (rows, errors, prompt_tokens, completion_tokens)."""
    if shards is None:
        shards = [{"rows": s.rows, "errors": s.errors, "prompt_tokens": s.prompt_tokens,
                   "completion_tokens": s.completion_tokens} for s in prepared.committed.shards]
    rows, errors = sum(s["rows"] for s in shards), sum(s["errors"] for s in shards)
    return JobCounts(
        rows_total=prepared.total_rows, rows=rows, rows_ok=rows - errors, rows_failed=errors,
        rows_rejected=rejected_rows(prepared.source), rows_resumed=resumed,
        prompt_tokens=sum(s["prompt_tokens"] for s in shards),
        completion_tokens=sum(s["completion_tokens"] for s in shards),
    )


def model_info(engine: Any) -> dict[str, Any]:
    if engine is not None and dataclasses.is_dataclass(engine.model_info):
        return dataclasses.asdict(engine.model_info)
    return {}


class AttemptTracker:
    """This attempt's counters: its results (the collector) and the engine's, summed over every engine
    it loaded (a fresh one after running out of memory). `snapshot` may be called from another thread:
    it only reads counters."""

    def __init__(self, prepared: PreparedRun, collector: ResultCollector) -> None:
        self.prepared = prepared
        self.collector = collector
        self.engine: Any = None
        self.started_at = time.time()
        self.resumed = prepared.committed.rows
        self.load_s = 0.0
        self._retired: list[Any] = []  # stats of engines dropped after running out of memory
        self.plan_stats: list[PlanStats] = []  # plan mode: one per engine pass (a retry re-plans the rows left)
        self.feed: Any = None  # plan mode: the first pass's PlannedFeed, while the engine may wait for it
        self._t0 = time.perf_counter()  # start of generation (reset by begin_generation)

    def begin_generation(self) -> None:
        self._t0 = time.perf_counter()

    def job_counts(self) -> JobCounts:
        return job_counts(self.prepared, self.resumed)

    def retire(self) -> None:
        if self.engine is not None:
            self._retired.append(self.engine.stats())
            self.engine = None

    def _stats(self) -> list[Any]:
        return self._retired + ([self.engine.stats()] if self.engine is not None else [])

    def _total(self, stats: list[Any], name: str) -> int:
        return sum(getattr(s, name, 0) for s in stats)

    def snapshot(self) -> WorkDone:
        c, stats = self.collector, self._stats()
        prefill, hits, shared = (self._total(stats, n) for n in ("prefill_tokens", "prefix_hit_tokens",
                                                                  "shared_prefix_tokens"))
        return WorkDone(
            rows=c.rows, rows_failed=c.rows_failed, rows_run=c.rows_run, prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens, prompt_tokens_processed=max(prefill + hits - shared, 0),
            output_tokens=self._total(stats, "sampled_tokens"), elapsed_s=self.generation_s(),
        )

    def generation_s(self) -> float:
        """Seconds the engine has had work: from begin_generation, less its wait for the global plan's
        first chunk (tokenizing and sorting every row: plan_s), so rates and the ETA count generation
        only. 0 while that wait lasts, and after it when the run stopped during it."""
        plans = list(self.plan_stats)
        live = self.feed
        if live is not None:
            if live.planning:
                return 0.0
            if not any(p is live.stats for p in plans):
                plans.append(live.stats)
        waited = sum(p.first_wait_s for p in plans)
        return max(time.perf_counter() - self._t0 - waited, 0.0)

    def counts(self, write_s: float = 0.0) -> AttemptCounts:
        c, stats = self.collector, self._stats()
        prefill, shared = self._total(stats, "prefill_tokens"), self._total(stats, "shared_prefix_tokens")
        # The reuse of the rows reported (the collector's), as their prompt tokens are: the engine's own
        # counter also has rows an interrupt cut off (hits above the prompt tokens). What those rows
        # computed stays in prefill_tokens, as recomputed work.
        hits = c.prefix_hit_tokens
        return AttemptCounts(
            rows=c.rows, rows_ok=c.rows_ok, rows_failed=c.rows_failed, rows_truncated=c.rows_truncated,
            prompt_tokens=c.prompt_tokens, prefix_hit_tokens=hits, prefill_tokens=prefill,
            shared_prefix_tokens=shared, recomputed_tokens=prefill - shared - (c.prompt_tokens - hits),
            unique_prompt_tokens=self._unique_prompt_tokens(stats), completion_tokens=c.completion_tokens,
            preemptions=self._total(stats, "preemptions"), sharing_fallbacks=self._total(stats, "sharing_fallbacks"),
            peak_kv_blocks=max((getattr(s, "peak_kv_blocks", 0) for s in stats), default=0),
            elapsed_s=max(self.generation_s() - write_s, 0.0), load_s=self.load_s, write_s=write_s,
            **self._plan_counts(stats),
        )

    def _unique_prompt_tokens(self, stats: list[Any]) -> int:
        # The first global plan covers every row of this attempt; a retry after running out of memory
        # re-plans a subset of them. Without a global plan: what the engine's own waves planned.
        if self.plan_stats:
            return self.plan_stats[0].unique_prompt_tokens
        return self._total(stats, "unique_prompt_tokens")

    def _plan_counts(self, stats: list[Any]) -> dict[str, Any]:
        plans = self.plan_stats
        return dict(
            plan_chunks=sum(p.chunks for p in plans), plan_boundary_tokens=self._total(stats, "cut_recomputed_tokens"),
            plan_out_of_core=any(p.out_of_core for p in plans), plan_s=sum(p.plan_s for p in plans),
            engine_wait_s=sum(p.engine_wait_s for p in plans),
        )

    def report(self, state: str, exit_code: int, write_s: float = 0.0, files: dict[str, Any] | None = None,
               error: str | None = None) -> RunReport:
        prepared = self.prepared
        last = self.engine.stats() if self.engine is not None else None
        return RunReport(
            state=state, exit_code=exit_code, started_at=self.started_at, finished_at=time.time(),
            **prepared.report_identity(),
            attempt=self.counts(write_s),
            job=self.job_counts(),
            model=model_info(self.engine) or dict(prepared.earlier_model),
            engine=engine_summary(last, prepared.params.max_tokens),
            first_errors=tuple(sorted(self.collector.first_errors)),  # the first to finish, in row order
            run_dir=str(prepared.run_dir.path) if prepared.run_dir is not None else None,
            error=error,
            **(files or {}),
        )

    def finished(self, write_s: float, files: dict[str, Any]) -> RunReport:
        job = job_counts(self.prepared, self.resumed)
        state = finished_state(job.rows_failed, job.rows_rejected)
        return self.report(state, EXIT_ROWS_FAILED if state == "finished_with_errors" else EXIT_OK, write_s, files)

    def stopped(self, exc: BaseException) -> BaseException:
        """`exc`, carrying the report of the attempt it stopped (see report_of)."""
        if isinstance(exc, (BatchLLMError, JobInterrupted)):
            exit_code = exc.exit_code
        else:  # KeyboardInterrupt: Ctrl-C without the signal guard (a library caller)
            exit_code = EXIT_SIGINT if isinstance(exc, KeyboardInterrupt) else EXIT_INTERNAL
        state = "interrupted" if isinstance(exc, (Interrupted, JobInterrupted, KeyboardInterrupt)) else "failed"
        report = self.report(state, exit_code, error=" ".join(str(exc).split()) or type(exc).__name__)
        try:
            setattr(exc, _REPORT_ATTR, report)
        except AttributeError:  # an exception type without a __dict__: no summary beyond the error line
            pass
        return exc
