"""Commits a run's results to shards of its run directory as rows finish: every N rows or T seconds,
the first shard sooner (see checkpoint.py for what a shard is)."""
from __future__ import annotations

import time

from batchllm_cli.checkpoint import Committed, RunDir
from batchllm_cli.collector import ResultCollector
from batchllm_cli.interrupts import SignalGuard
from batchllm_cli.job_types import PreparedRun
from batchllm_cli.table_io import ROW_ID

# The first shard of an attempt is committed after this fraction of --checkpoint-seconds of results
# (5 s of the default 60), so `status` has a rate and a count to show early; then every N rows or T s.
FIRST_SHARD_FRACTION = 1 / 12


class ShardSink:
    """Buffers results and commits a shard every N rows or T seconds (the first one sooner)."""

    def __init__(self, run_dir: RunDir, committed: Committed, collector: ResultCollector, guard: SignalGuard,
                 every_rows: int, every_s: float, worker: int | None = None) -> None:
        self.run_dir = run_dir
        self.committed = committed
        self.collector = collector
        self.guard = guard
        self.every_rows = every_rows
        self.every_s = every_s
        self.worker = worker  # a scale-out worker's number, in its shard names (ray_run.py)
        self._last: float | None = None  # the last commit; before the first one, the first result
        self._first = True

    @classmethod
    def for_run(cls, prepared: PreparedRun, guard: SignalGuard) -> "ShardSink":
        assert prepared.run_dir is not None
        return cls(prepared.run_dir, prepared.committed, ResultCollector(prepared.columns, prepared.constraint),
                   guard, prepared.settings.checkpoint_rows, prepared.settings.checkpoint_seconds)

    def maybe_commit(self) -> None:
        pending = self.collector.pending
        if not pending:
            return
        now = time.monotonic()
        if self._last is None:
            self._last = now
        due_s = self.every_s * FIRST_SHARD_FRACTION if self._first else self.every_s
        if pending >= self.every_rows or now - self._last >= due_s:
            self.commit()

    def commit(self) -> None:
        if not self.collector.pending:
            return
        with self.guard.critical():
            table = self.collector.drain()
            info = self.run_dir.commit_shard(table, self.committed.next_seq, self.worker)
            self.committed.next_seq += 1
            self.committed.shards.append(info)
            self.committed.done[table.column(ROW_ID).to_numpy()] = True
        self._last = time.monotonic()
        self._first = False

    def salvage(self) -> None:
        """Commit what finished before a failure; a second failure (disk full) loses only those rows."""
        try:
            self.commit()
        except BaseException:  # noqa: BLE001 - the original error is the one to report
            pass
