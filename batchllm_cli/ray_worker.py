"""One engine replica of a scale-out run (`run --workers N`, see ray_run.py): a Ray actor.

The driver plans the whole job and sends each replica its rows as token ids in plan order (the global
sorted order, restricted to its part). The replica loads the model once, runs its rows through its own
engine chunk by chunk exactly as a single-process run does, and commits result shards into the job's
one run directory with the same atomic protocol (checkpoint.py), under shard names that carry its
number. Ray is not imported here: the driver wraps `ReplicaWorker` with `ray.remote`.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator

import numpy as np

from batchllm_cli.checkpoint import MANIFEST, Committed, RunDir, ShardInfo
from batchllm_cli.collector import OutputColumns, ResultCollector
from batchllm_cli.interrupts import null_guard
from batchllm_cli.job import collect_results
from batchllm_cli.job_types import SilentObserver
from batchllm_cli.shard_sink import ShardSink
from batchllm_cli.structured_output import Constraint


@dataclass(frozen=True)
class WorkerSetup:
    """What every replica needs, sent once when it is created."""

    worker: int  # its number, in its shard names
    run_dir: str
    run_id: str  # the manifest's run id: seeing it proves the run directory is shared
    model_dir: str
    engine_config: Any  # engine.EngineConfig
    params: Any  # engine.SamplingParams
    columns: OutputColumns
    constraint: Constraint | None
    total_rows: int
    checkpoint_rows: int
    checkpoint_seconds: float
    plan_chunk_tokens: int
    planned: bool  # --prefix-sharing plan: chunks of the global order, else the engine's own waves
    env: dict[str, str] = field(default_factory=dict)  # thread settings, applied before torch loads


@dataclass(frozen=True)
class WorkerPart:
    """One replica's rows in plan order: tokens int32 (t,) packed by offsets int64 (m + 1,)."""

    row_ids: np.ndarray  # int64 (m,)
    keys: list[Any] | None  # the --id-column values (the sampler's per-row key), else the row ids are
    truncated: np.ndarray  # bool (m,)
    tokens: np.ndarray
    offsets: np.ndarray


@dataclass(frozen=True)
class WorkerCounts:
    """A replica's results so far (ResultCollector's counters) and its engine's counters."""

    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_run: int = 0
    rows_truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_hit_tokens: int = 0  # of prompt_tokens, reused instead of computed
    first_errors: tuple[tuple[int, str], ...] = ()
    engine_stats: Any = None  # engine.EngineStats over the engine's lifetime
    engine_s: float = 0.0  # time spent running parts
    chunks: int = 0

    @classmethod
    def of(cls, collector: ResultCollector | None, engine: Any, engine_s: float, chunks: int) -> WorkerCounts:
        c = collector or ResultCollector()
        return cls(c.rows, c.rows_ok, c.rows_failed, c.rows_run, c.rows_truncated, c.prompt_tokens,
                   c.completion_tokens, c.prefix_hit_tokens, tuple(c.first_errors),
                   engine.stats() if engine is not None else None, engine_s, chunks)


@dataclass(frozen=True)
class WorkerReport:
    """A finished part: the shards it committed and the replica's counters after it."""

    shards: tuple[ShardInfo, ...]
    counts: WorkerCounts


class ReplicaWorker:
    """Created once per replica (and again by Ray after its process dies); `check`, then `load`, then
    `run` once per part. `progress` may be called while `run` works (the actor has two threads)."""

    def __init__(self, setup: WorkerSetup) -> None:
        os.environ.update(setup.env)  # before the engine (and torch) is imported in this process
        self.setup = setup
        self.engine: Any = None
        self._collector: ResultCollector | None = None  # the current part's (counters of earlier parts are kept)
        self._done = WorkerCounts()
        self._engine_s = 0.0
        self._chunks = 0

    def check(self) -> tuple[str, int, str | None]:
        """(host, pid, why the run directory is not usable here, or None)."""
        host, pid = socket.gethostname(), os.getpid()
        path = Path(self.setup.run_dir) / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return host, pid, f"cannot read {path} ({exc.__class__.__name__})"
        if not isinstance(manifest, dict) or manifest.get("run_id") != self.setup.run_id:
            return host, pid, f"{path} there belongs to another run"
        return host, pid, None

    def load(self) -> dict[str, Any]:
        """Load the model (once per process); returns its description for the report."""
        import dataclasses

        from engine import LLMEngine, Tokenizer

        if self.engine is None:
            tokenizer = Tokenizer(Path(self.setup.model_dir))
            self.engine = LLMEngine(self.setup.engine_config, tokenizer=tokenizer)
        info = self.engine.model_info
        return dataclasses.asdict(info) if dataclasses.is_dataclass(info) else {}

    def progress(self) -> WorkerCounts:
        return self._counts()

    def _counts(self) -> WorkerCounts:
        live = WorkerCounts.of(self._collector, self.engine, self._engine_s, self._chunks)
        d = self._done
        return WorkerCounts(
            *(getattr(d, f) + getattr(live, f) for f in ("rows", "rows_ok", "rows_failed", "rows_run", "rows_truncated",
                                                            "prompt_tokens", "completion_tokens", "prefix_hit_tokens")),
            first_errors=(d.first_errors + live.first_errors)[:5], engine_stats=live.engine_stats,
            engine_s=live.engine_s, chunks=live.chunks,
        )

    def run(self, part: WorkerPart, seq_start: int) -> WorkerReport:
        """Run every row of `part` and commit them all, shards numbered from `seq_start`; returns the
        shards committed."""
        s = self.setup
        self.load()
        t0 = time.perf_counter()
        self._done = self._counts()
        collector = ResultCollector(s.columns, s.constraint)
        committed = Committed(done=np.zeros(s.total_rows, dtype=bool), next_seq=seq_start)
        sink = ShardSink(RunDir(Path(s.run_dir)), committed, collector, null_guard(), s.checkpoint_rows,
                         s.checkpoint_seconds, worker=s.worker)
        self._collector = collector
        in_flight: dict[Hashable, tuple[int, bool]] = {}
        try:
            chunks = self._chunks_of(part, in_flight)
            if s.planned:
                results = self.engine.generate_planned(chunks)
            else:
                results = self.engine.generate(r for chunk in chunks for r in chunk.requests)
            collect_results(results, in_flight, sink, SilentObserver())
            sink.commit()
        finally:
            self._engine_s += time.perf_counter() - t0
        assert committed.done[part.row_ids].all()
        return WorkerReport(tuple(committed.shards), self._counts())

    def _chunks_of(self, part: WorkerPart, in_flight: dict[Hashable, tuple[int, bool]]) -> Iterator[Any]:
        """The part as engine.PlanChunk, cut where the fewest tokens are shared (as planned_feed does)."""
        from engine import PackedSequences, PlanChunk, cut_sorted_rows, sort_sequences

        # The part is in sorted order already; sorting again (stable) gives its neighbour LCPs.
        ordered = sort_sequences(PackedSequences(part.tokens, part.offsets))
        order, lcp = ordered.order, ordered.lcp
        lengths = np.diff(part.offsets)[order]
        cuts = cut_sorted_rows(lengths, lcp, self.setup.plan_chunk_tokens)
        self._chunks += cuts.num_chunks
        keys = part.keys if part.keys is not None else part.row_ids.tolist()
        offsets = part.offsets.tolist()
        starts = cuts.starts.tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            requests = []
            for i in order[a:b].tolist():
                in_flight[keys[i]] = (int(part.row_ids[i]), bool(part.truncated[i]))
                requests.append((keys[i], part.tokens[offsets[i] : offsets[i + 1]].tolist(), self.setup.params))
            yield PlanChunk(requests, int(lcp[b]) if b < len(order) else 0)
