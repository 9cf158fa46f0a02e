"""The report of a scale-out run (ray_run.py): the attempt's counters summed over the driver and every
replica, read by progress and by the summary exactly as for one process, plus the `scale_out` part."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from batchllm_cli.checkpoint import read_commit_records
from batchllm_cli.job_report import AttemptTracker, job_counts
from batchllm_cli.job_types import JobCounts, PreparedRun, RunReport, engine_summary
from batchllm_cli.ray_worker import WorkerCounts


class ScaleOutTracker(AttemptTracker):
    """The attempt's counters summed over the driver's own results (rows failed before any engine) and
    every replica's: `collector` and `_stats` are views over them, so progress and the report read the
    same numbers as for one process."""

    def __init__(self, prepared: PreparedRun, driver_collector: Any, workers: int) -> None:
        super().__init__(prepared, driver_collector)
        self.driver = driver_collector
        self.live: dict[int, WorkerCounts] = {}  # replica -> its counters (lifetime of its current process)
        self.retired: list[WorkerCounts] = []  # replicas' processes that died: what they committed
        self.reported: dict[int, WorkerCounts] = {}  # replica -> its counters when it last finished a part
        self.workers = workers
        self.partition: dict[str, Any] | None = None
        self.rounds = 0
        self.failures = 0
        self.hosts: dict[int, str] = {}
        self.model: dict[str, Any] = {}
        self._stopping = False  # stopped mid-round: the job's counts come from the commit records
        self._refresh()  # self.collector: the merged counters, remade on each read

    def job_counts(self) -> JobCounts:
        """The whole job's counts from the commit records in the run directory: the replicas commit
        there themselves, so the driver's own view (reloaded after each round) lags behind when the run
        stops mid-round (an interrupted summary said 0 rows of a job with 80 committed)."""
        if not self._stopping or self.prepared.run_dir is None:
            return super().job_counts()  # a finished run reloaded every commit after its last round
        records, _ = read_commit_records(self.prepared.run_dir.path)
        return job_counts(self.prepared, self.resumed, records) if records else super().job_counts()

    def stopped(self, exc: BaseException) -> BaseException:
        self._stopping = True
        return super().stopped(exc)

    def _all(self) -> list[Any]:
        return [self.driver, *self.live.values(), *self.retired]

    def _refresh(self) -> None:
        parts = self._all()
        fields = ("rows", "rows_ok", "rows_failed", "rows_run", "rows_truncated", "prompt_tokens", "prefix_hit_tokens",
                  "completion_tokens")
        merged = {f: sum(getattr(p, f) for p in parts) for f in fields}
        errors = sorted(e for p in parts for e in p.first_errors)[:5]
        self.collector = SimpleNamespace(**merged, first_errors=errors)

    def update(self, replica: int, counts: WorkerCounts) -> None:
        self.live[replica] = counts
        self._refresh()

    def finished_part(self, replica: int, counts: WorkerCounts) -> None:
        self.reported[replica] = counts
        self.update(replica, counts)

    def died(self, replica: int, committed: WorkerCounts) -> None:
        """The replica's process died (its counters restart with the next one). Its rows are those of
        the parts it finished plus `committed`, the shards it committed since; its engine's work and
        prompt tokens come from its last progress report, which read them together (so the token
        identity of the summary holds), rows it finished but never committed included."""
        last = self.live.pop(replica, None) or WorkerCounts()
        done = self.reported.pop(replica, None) or WorkerCounts()
        rows = {f: getattr(done, f) + getattr(committed, f) for f in _ROW_FIELDS}
        self.retired.append(WorkerCounts(**rows, rows_truncated=done.rows_truncated, prompt_tokens=last.prompt_tokens,
                                         prefix_hit_tokens=last.prefix_hit_tokens,
                                         first_errors=last.first_errors,
                                         engine_stats=last.engine_stats, engine_s=last.engine_s))
        self.failures += 1
        self._refresh()

    def snapshot(self) -> Any:
        self._refresh()
        return super().snapshot()

    def _stats(self) -> list[Any]:
        return [c.engine_stats for c in (*self.live.values(), *self.retired) if c.engine_stats is not None]

    def report(self, state: str, exit_code: int, write_s: float = 0.0, files: dict[str, Any] | None = None,
               error: str | None = None) -> RunReport:
        self._refresh()
        base = super().report(state, exit_code, write_s, files, error)
        stats = self._stats()
        merged = SimpleNamespace(
            steps=sum(s.steps for s in stats), graph_steps=sum(s.graph_steps for s in stats),
            peak_kv_blocks=max((s.peak_kv_blocks for s in stats), default=0),
            kv_blocks_total=sum(s.kv_blocks_total for s in self._current_stats()),
        ) if stats else None
        per_worker = [
            {"worker": k, "host": self.hosts.get(k), "rows": c.rows, "rows_failed": c.rows_failed,
             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
             "engine_s": round(c.engine_s, 3)}
            for k, c in sorted(self.live.items())
        ]
        scale_out = {"ray": self.prepared.settings.ray_address or "local", "per_worker": per_worker,
                     "partition": self.partition, "rounds": self.rounds, "worker_failures": self.failures}
        return dataclasses.replace(base, workers=self.workers, scale_out=scale_out, model=self.model or base.model,
                                   engine=engine_summary(merged, self.prepared.params.max_tokens))

    def _current_stats(self) -> list[Any]:
        return [c.engine_stats for c in self.live.values() if c.engine_stats is not None]


# WorkerCounts fields a dead replica's shards tell (the rows it committed and their answers' tokens)
_ROW_FIELDS = ("rows", "rows_ok", "rows_failed", "rows_run", "completion_tokens")


def shard_counts(shards: list[Any]) -> WorkerCounts:
    """What a dead replica had committed, from its shards' records."""
    rows, errors = sum(s.rows for s in shards), sum(s.errors for s in shards)
    return WorkerCounts(rows=rows, rows_ok=rows - errors, rows_failed=errors, rows_run=rows - errors,
                        prompt_tokens=sum(s.prompt_tokens for s in shards),
                        completion_tokens=sum(s.completion_tokens for s in shards))
