"""`run --prefix-sharing plan`: the whole job planned at once, fed to the engine chunk by chunk.

BatchLLM's plan is global: a prefix is computed once per job however the table is ordered. So a
background thread renders and tokenizes every row not yet committed into a token spool on disk,
sorts the spool (in memory, or out of core with DuckDB when it would not fit), cuts the sorted rows
into chunks where the fewest tokens are shared across a cut (engine.planning.chunks), and queues each
chunk's requests while the engine works on the one before. Only a chunk or two of requests is ever
held as Python lists; rows are read from the spool one at a time.

The engine's loop runs in the main thread and takes chunks from the queue; the time it spends
blocked there after the first chunk is its wait for work (reported in the summary). Rows that fail
to render or do not fit come through the queue too, so only the main thread touches the collector
and the shards.
"""
from __future__ import annotations

import dataclasses
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator

import numpy as np

from batchllm_cli.plain_paths import private_dir, temp_writes
from batchllm_cli.prompts import FailedRow, fit_packed
from batchllm_cli.table_io import ROW_ID
from batchllm_cli.token_spool import TokenSpool, sort_spool

if TYPE_CHECKING:
    from batchllm_cli.job_types import PreparedRun

# Prompt tokens per chunk: ~36 bytes each as Python ints while queued, so two chunks in flight cost
# ~150 MB; a cut costs only the tokens shared across it, so more chunks cost little prefill.
DEFAULT_PLAN_CHUNK_TOKENS = 1 << 21
_POLL_S = 0.2

Request = tuple[Hashable, list[int], Any]


@dataclass(frozen=True)
class PlanStats:
    """What the global plan of this run's rows found, and what feeding it cost."""

    rows: int = 0  # rows planned (not committed before, rendered and fitting the context)
    prompt_tokens: int = 0
    unique_prompt_tokens: int = 0  # the whole job's prefix-trie tokens: the least prefill possible
    chunks: int = 0
    out_of_core: bool = False  # sorted by DuckDB, spilling to disk, because memory was short
    # rendering, tokenizing, spooling and sorting before the first chunk (or until the plan ended without
    # one, or was stopped)
    plan_s: float = 0.0
    first_wait_s: float = 0.0  # the engine, loaded, waiting for its first chunk (the rest of plan_s)
    engine_wait_s: float = 0.0  # the engine blocked waiting for its next chunk


@dataclass(frozen=True)
class _Chunk:
    row_ids: np.ndarray  # int64 (m,), table row ids in plan order
    truncated: np.ndarray  # bool (m,)
    work: Any  # engine.PlanChunk: the requests and the tokens shared with the next chunk


class PlannedFeed:
    """Start with `start()`; pull with `chunks()` from the main thread; always `close()`."""

    def __init__(self, prepared: PreparedRun, done: np.ndarray, chunk_tokens: int = DEFAULT_PLAN_CHUNK_TOKENS,
                 memory_budget: int | None = None) -> None:
        self._prepared = prepared
        self._done = done.copy()  # the committed rows when the feed started; the sink's array changes
        self._chunk_tokens = chunk_tokens
        self._budget = memory_budget  # None: token_spool.choose_sort's default, when the sort starts
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batchllm-plan", daemon=True)
        # The spool and the out-of-core sort's spill files: removed by close(), or after a kill by the next run.
        self._dir = private_dir()
        self._t0 = time.perf_counter()
        self.stats = PlanStats()
        self.handed_out = False  # the engine has had its first chunk
        self._ended = False  # the plan was fed to its end (maybe without a chunk: every row failed)
        self._asked: float | None = None  # when the engine, loaded, asked for its first chunk

    @property
    def planning(self) -> bool:
        """The engine has nothing of the plan yet: its rows are still being tokenized and sorted (or were,
        when the run stopped)."""
        return not (self.handed_out or self._ended)

    def start(self) -> "PlannedFeed":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def close(self) -> None:
        if self.planning and not self._stop.is_set():  # stopped while planning: that time is still plan_s
            self._planned_until(time.perf_counter())
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _planned_until(self, now: float) -> None:
        waited = now - self._asked if self._asked is not None else 0.0
        self.stats = dataclasses.replace(self.stats, plan_s=now - self._t0, first_wait_s=waited)

    # -- main thread ------------------------------------------------------------------------------
    def chunks(
        self, on_failed: Callable[[FailedRow], None], in_flight: dict[Hashable, tuple[int, bool]]
    ) -> Iterator[Any]:
        """The job's requests as engine.PlanChunk, in plan order; failures go to `on_failed` as they come and
        every request's key is entered in `in_flight` (-> row id, truncated) before it is handed out."""
        first = True
        wait = 0.0
        self._asked = time.perf_counter()  # the engine is loaded and wants its first chunk
        while True:
            t = time.perf_counter()
            kind, item = self._get()
            if not first:
                wait += time.perf_counter() - t
            if kind == "failed":
                for row in item:
                    on_failed(row)
            elif kind == "planned":
                self.stats = item
            elif kind == "chunk":
                if first:
                    self._planned_until(time.perf_counter())
                    self.handed_out = True
                first = False
                for (key, _, _), row_id, cut in zip(item.work.requests, item.row_ids.tolist(), item.truncated.tolist()):
                    in_flight[key] = (row_id, cut)
                yield item.work
                self.stats = dataclasses.replace(self.stats, engine_wait_s=wait)
            elif kind == "error":
                raise item
            else:
                assert kind == "end", kind
                if first:
                    self._planned_until(time.perf_counter())
                self._ended = True
                self.stats = dataclasses.replace(self.stats, engine_wait_s=wait)
                return

    def _get(self) -> tuple[str, Any]:
        # Polled, not blocking, so a signal reaches the main thread at once.
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return ("error", RuntimeError("the planning thread stopped without a result"))

    # -- planning thread --------------------------------------------------------------------------
    def _put(self, kind: str, item: Any = None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put((kind, item), timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _produce(self) -> None:
        try:
            with temp_writes(self._dir):  # a full temp directory stops the run with exit 75, not a traceback
                spool = TokenSpool(self._dir)
                truncated, keys = self._tokenize(spool)
                order, lcp, out_of_core = sort_spool(spool, self._budget, self._dir)
            self._feed(spool, order, lcp, truncated, keys, out_of_core)
            self._put("end")
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            try:
                self._put("error", exc)
            except _Stopped:
                return

    def _tokenize(self, spool: TokenSpool) -> tuple[np.ndarray, list[Any] | None]:
        def stopped() -> bool:
            if self._stop.is_set():
                raise _Stopped
            return False

        return tokenize_rows(self._prepared, self._done, spool, lambda rows: self._put("failed", rows), stopped)

    def _feed(self, spool: TokenSpool, order: np.ndarray, lcp: np.ndarray, truncated: np.ndarray,
              keys: list[Any] | None, out_of_core: bool) -> None:
        from engine import PlanChunk, cut_sorted_rows, unique_prompt_tokens

        lengths = spool.lengths
        lengths_sorted = lengths[order]
        cuts = cut_sorted_rows(lengths_sorted, lcp, self._chunk_tokens)
        self._put("planned", PlanStats(
            rows=len(order), prompt_tokens=int(lengths.sum()),
            unique_prompt_tokens=unique_prompt_tokens(lengths_sorted, lcp),
            chunks=cuts.num_chunks, out_of_core=out_of_core,
        ))
        row_ids = spool.row_ids
        params = self._prepared.params
        starts = cuts.starts.tolist()
        with spool.row_reader() as tokens_of:
            for a, b in zip(starts[:-1], starts[1:]):
                idx = order[a:b]
                chunk_row_ids = row_ids[idx]
                # The engine's random stream of a row is keyed by this value: the ordinal row id, or the
                # user's id, so a resumed run samples every row exactly as an uninterrupted one.
                chunk_keys = [keys[i] for i in idx.tolist()] if keys is not None else chunk_row_ids.tolist()
                requests = [(key, tokens_of(i), params) for key, i in zip(chunk_keys, idx.tolist())]
                shared = int(lcp[b]) if b < len(order) else 0
                self._put("chunk", _Chunk(chunk_row_ids, truncated[idx], PlanChunk(requests, shared)))


def tokenize_rows(prepared: PreparedRun, done: np.ndarray, spool: TokenSpool,
                  on_failed: Callable[[list[FailedRow]], None], stopped: Callable[[], bool] = lambda: False,
                  ) -> tuple[np.ndarray, list[Any] | None]:
    """Every row not `done` into the spool, exactly as the engine gets it: (truncated flags, the id
    column's values or None), both in spool order. Rows that fail to render or fit go to `on_failed`."""
    s = prepared.settings
    encoder = prepared.prompt_encoder()
    truncated: list[np.ndarray] = []
    keys: list[Any] | None = [] if s.id_column else None
    for batch in prepared.pending_batches(done):
        if stopped():
            break
        packed, _ = fit_packed(encoder.encode_packed(batch), prepared.max_prompt_tokens, s.truncate)
        if packed.failed:
            on_failed(packed.failed)
        if not len(packed.row_ids):
            continue
        spool.append(packed.row_ids, packed.tokens, packed.lengths)
        truncated.append(packed.truncated_mask())
        if keys is not None:
            assert s.id_column is not None
            at = np.searchsorted(batch.column(ROW_ID).to_numpy(), packed.row_ids)
            keys.extend(batch.column(s.id_column).take(at).to_pylist())
    return (np.concatenate(truncated) if truncated else np.zeros(0, dtype=bool)), keys


class _Stopped(Exception):
    """The main thread closed the feed: the planning thread ends quietly."""
