"""`run --workers N` / `--ray-address ADDR`: one job over N engine replicas through Ray, resumable as one.

The driver (this process) does what a single-process run does around the engine: it holds the locks,
the manifest and the checkpoint, plans the whole job at once (every row not yet committed is rendered,
tokenized and sorted, planned_feed.tokenize_rows and token_spool.sort_spool), and writes the output
and the marker. Between planning and writing, the sorted rows are partitioned by top-level prefix group
into N parts of about equal work (engine.partition_sorted), and each part goes to a replica, a Ray
actor with its own engine (ray_worker.py), which commits its results into the job's one run directory.
The run directory must be on a filesystem every replica sees: each replica proves it by reading the
manifest this run wrote before any model loads.

Progress and the summary sum the driver's and the replicas' counters (ray_report.py).

A replica whose process dies (killed, node lost) is restarted by Ray; its part's committed rows stay,
and once the other replicas finish, the rows left are planned and partitioned again over the replicas
that are up, until none is left. A re-run of the command resumes the same way from the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from batchllm_cli.checkpoint import Committed, read_commit_records
from batchllm_cli.errors import BatchLLMError, TempFailError, UsageError
from batchllm_cli.interrupts import JobInterrupted, SignalGuard, null_guard
from batchllm_cli.job import is_out_of_memory, raise_stopped, write_output
from batchllm_cli.job_types import PreparedRun, RunObserver, RunReport, RunSettings, SilentObserver
from batchllm_cli.plain_paths import private_dir, temp_writes
from batchllm_cli.planned_feed import PlanStats, tokenize_rows
from batchllm_cli.ray_report import ScaleOutTracker, shard_counts
from batchllm_cli.ray_worker import ReplicaWorker, WorkerPart, WorkerReport, WorkerSetup
from batchllm_cli.run_prepare import discard_new_checkpoint
from batchllm_cli.shard_sink import ShardSink
from batchllm_cli.token_spool import TokenSpool, default_memory_budget, sort_spool

RAY_MISSING = "--workers and --ray-address need Ray, an optional extra: pip install 'batchllm[ray]'."
# A round of parts in which no row got committed (every replica died at once, repeatedly) ends the job.
MAX_FRUITLESS_ROUNDS = 2
_POLL_S = 0.5


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def check_scale_out(settings: RunSettings) -> None:
    """UsageError (before anything loads) unless Ray can be imported."""
    _import_ray()
    if settings.workers is not None and settings.workers < 1:
        raise UsageError("--workers must be at least 1.")
    if settings.ray_address is not None:
        _check_ray_address(settings.ray_address)


def _check_ray_address(address: str) -> None:
    """UsageError unless `address` is auto, local or a host:port that takes a connection: found here, before
    the run writes anything (a run directory left by a refused run read as interrupted)."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise UsageError(f"--ray-address {address} is not a Ray address: give the head node's host:port "
                         "(e.g. 10.0.0.5:6379), or auto on a node of the cluster.")
    problem = unreachable_ray_address(address)
    if problem:  # Ray itself retries an unreachable address for minutes, logging as it goes
        raise UsageError(
            f"Cannot reach the Ray cluster at --ray-address {address} ({problem}); give the head node's "
            "host:port (e.g. 10.0.0.5:6379), or auto on a node of the cluster.")


@dataclass(frozen=True)
class _Part:
    """A part put in Ray's object store (which spills to disk when full), and its rows."""

    ref: Any  # ObjectRef of the WorkerPart
    row_ids: np.ndarray  # int64 (m,)


@dataclass(frozen=True)
class _Plan:
    parts: list[_Part]  # one per replica of the round (empty parts left out)
    replicas: list[int]  # the replica (index into the pool) of each part
    stats: PlanStats
    partition: dict[str, Any]


def unreachable_ray_address(address: str, timeout_s: float = 10.0) -> str | None:
    """Why a host:port (or ray://host:port) address takes no connection within `timeout_s`; None when it does."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


class _Pool:
    """The replicas: Ray actors created once per run; Ray restarts one whose process dies."""

    def __init__(self, ray: Any, prepared: PreparedRun, guard: SignalGuard) -> None:
        self.t0 = time.perf_counter()
        self.ray = ray
        self.started_ray = False
        self.actors: list[Any] = []
        if not ray.is_initialized():  # (a library caller, or a test, may have connected already)
            try:  # (--ray-address was checked with the other settings, before anything was written)
                ray.init(address=prepared.settings.ray_address, include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
            except SystemExit as exc:  # Ray's SIGTERM handler, set while init runs
                if exc.code != signal.SIGTERM:
                    raise
                raise JobInterrupted(signal.SIGTERM) from None
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, ...
                where = prepared.settings.ray_address or "a local Ray"
                raise UsageError(f"Cannot start or join {where}: {' '.join(str(exc).split())[:200]}.") from None
            finally:
                guard.reclaim()
            self.started_ray = True
        try:
            self._start(prepared)
        except BaseException:
            self.close()
            raise

    def _start(self, prepared: PreparedRun) -> None:
        ray, settings = self.ray, prepared.settings
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        use_gpu = gpus > 0 and settings.device != "cpu"
        if settings.device == "cuda" and not gpus:
            raise UsageError("--device cuda: the Ray cluster has no GPU; drop --device or give a cluster with GPUs.")
        n = settings.workers or max(gpus if use_gpu else 1, 1)
        if use_gpu and n > gpus:
            raise UsageError(f"--workers {n} needs {n} GPUs (one each); the Ray cluster has {gpus}.")
        self.threads = 0 if use_gpu else max(1, int(cpus // n))
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        if not use_gpu:
            env["BATCHLLM_NUM_THREADS"] = os.environ.get("BATCHLLM_NUM_THREADS") or str(self.threads)
        assert prepared.run_dir is not None
        manifest = prepared.run_dir.read_manifest()
        assert manifest is not None
        actor = ray.remote(ReplicaWorker).options(
            num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else cpus / n, max_restarts=2, max_task_retries=0,
            max_concurrency=2,  # `progress` runs while `run` works
        )
        s = prepared.settings
        # absolute paths: a replica's working directory is Ray's, not this process's
        model_dir = str(Path(prepared.model_dir).resolve())
        config = dataclasses.replace(prepared.engine_config, model_dir=model_dir)
        self.actors = [
            actor.remote(WorkerSetup(
                worker=k, run_dir=str(prepared.run_dir.path.resolve()), run_id=manifest["run_id"],
                model_dir=model_dir, engine_config=config, params=prepared.params,
                columns=prepared.columns, constraint=prepared.constraint, total_rows=prepared.total_rows,
                checkpoint_rows=s.checkpoint_rows, checkpoint_seconds=s.checkpoint_seconds,
                plan_chunk_tokens=s.plan_chunk_tokens, planned=s.prefix_sharing == "plan", env=env,
            ))
            for k in range(n)
        ]
        self.alive = list(range(n))
        self.where = settings.ray_address or "a local Ray"
        self.use_gpu = use_gpu
        self.model: dict[str, Any] = {}
        self._loading: list[Any] = []
        self.hosts: dict[int, str] = {}

    def check_and_load(self, observer: RunObserver, run_dir: Path) -> None:
        """Every replica sees the run directory (else UsageError); then their models start loading."""
        ray = self.ray
        checks = ray.get([a.check.remote() for a in self.actors])
        for k, (host, pid, problem) in enumerate(checks):
            if problem is not None:
                raise UsageError(
                    f"The checkpoint directory {run_dir} is not visible from worker {k} on {host}: {problem}; put "
                    "--output (or --checkpoint-dir) on a filesystem every Ray node mounts at the same path."
                )
            self.hosts[k] = host
            observer.notice(f"worker {k}: pid {pid} on {host}")
        self._loading = [a.load.remote() for a in self.actors]

    def wait_loaded(self) -> None:
        if self._loading:
            self.model = self._get(self._loading)[0]
            self._loading = []

    def _get(self, refs: Any) -> Any:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as exc:
            raise _start_cause(exc) from None
        except self.ray.exceptions.RayActorError as exc:
            raise BatchLLMError(f"A worker's process died while loading the model ({' '.join(str(exc).split())[:200]}); "
                                "run the same command again.") from None

    def revive(self, dead: list[int]) -> None:
        """Replicas Ray restarted after their process died load their model again; one that does not
        come back is left out of later rounds."""
        for k in dead:
            try:
                self.ray.get(self.actors[k].load.remote())
            except self.ray.exceptions.RayActorError:
                self.alive.remove(k)
            except self.ray.exceptions.RayTaskError as exc:
                raise _start_cause(exc) from None

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.started_ray:
            self.ray.shutdown()


def _start_cause(exc: Any) -> BaseException:
    """_cause of a replica's engine failing to start: a model or setting it refuses (ModelLoadError,
    ConfigError) is a usage error, as in one process (job._load_engine)."""
    from engine import ConfigError, ModelLoadError

    cause = getattr(exc, "cause", None)
    if isinstance(cause, (ModelLoadError, ConfigError)):
        return UsageError(str(cause))
    return _cause(exc)


def _cause(exc: Any) -> BaseException:
    """The replica's own exception (a BatchLLMError keeps its exit code), else a one-line error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and is_out_of_memory(cause):
        return TempFailError(
            f"Out of GPU memory on a worker ({' '.join(str(cause).split())[:200]}). Finished rows are kept; run "
            "again with a smaller --max-batch-tokens or --kv-cache-memory to resume."
        )
    if isinstance(cause, BaseException):
        return cause if isinstance(cause, BatchLLMError) else BatchLLMError(f"A worker failed: {cause!r}")
    return BatchLLMError(f"A worker failed: {' '.join(str(exc).split())[:300]}")


def _plan(prepared: PreparedRun, done: np.ndarray, sink: Any, replicas: list[int], tmp: Path,
          put: Callable[[WorkerPart], Any]) -> _Plan:
    """Tokenize and sort every row not `done`, partition the sorted rows over `replicas`, each part
    given to `put` (ray.put) as soon as it is read; rows that fail to render or fit are committed by
    the driver (`sink`). The driver holds O(rows) and one part's tokens at a time, never the job's."""
    from engine import partition_sorted, unique_prompt_tokens

    t0 = time.perf_counter()

    def failed(rows: list[Any]) -> None:
        for row in rows:
            sink.collector.add_failure(row.row_id, row.error, row.kind)

    with temp_writes(tmp):  # a full temp directory stops the run with exit 75, not a traceback
        spool = TokenSpool(tmp)
        truncated, keys = tokenize_rows(prepared, done, spool, failed)
    sink.commit()
    with temp_writes(tmp):
        order, lcp, out_of_core = sort_spool(spool, default_memory_budget(), tmp)
    lengths = spool.lengths
    lengths_sorted = lengths[order]
    part = partition_sorted(lengths_sorted, lcp, prepared.params.max_tokens, len(replicas))
    row_ids = spool.row_ids
    parts, owners = [], []
    for p, replica in enumerate(replicas):
        idx = order[part.part == p]  # spool indices of this part, in plan order
        if not len(idx):
            continue
        tokens, offsets = spool.packed_rows(idx)
        ref = put(WorkerPart(row_ids=row_ids[idx], keys=[keys[i] for i in idx.tolist()] if keys is not None else None,
                             truncated=truncated[idx], tokens=tokens, offsets=offsets))
        del tokens  # the object store has it now
        parts.append(_Part(ref, row_ids[idx]))
        owners.append(replica)
    stats = PlanStats(rows=len(order), prompt_tokens=int(lengths.sum()),
                      unique_prompt_tokens=unique_prompt_tokens(lengths_sorted, lcp), out_of_core=out_of_core,
                      plan_s=time.perf_counter() - t0)
    summary = {"top_groups": part.top_groups, "split_groups": part.split_groups, "balance": round(part.balance, 4),
               "work": part.work.tolist()}
    return _Plan(parts, owners, stats, summary)


def execute_ray_run(prepared: PreparedRun, observer: RunObserver | None = None,
                    guard: SignalGuard | None = None) -> RunReport:
    """execute_run's scale-out twin: plan, partition, run the parts on the replicas, write the output.
    While it runs, what Ray's driver prints to stdout (a replica that died: "(raylet) A worker died
    ...") goes to stderr: stdout carries the command's data (`--summary -`, one line of JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        return _execute_ray_run(prepared, observer, guard)


def _execute_ray_run(prepared: PreparedRun, observer: RunObserver | None, guard: SignalGuard | None) -> RunReport:
    observer = observer or SilentObserver()
    guard = guard or null_guard()
    ray = _import_ray()
    assert prepared.run_dir is not None
    sink = ShardSink.for_run(prepared, guard)  # the driver's own results: rows failed before any engine
    tracker = ScaleOutTracker(prepared, sink.collector, prepared.settings.workers or 1)
    pool: _Pool | None = None
    tmp = private_dir()  # the token spool: removed below, or after a kill by the next run
    try:
        try:
            if not prepared.committed.done.all():
                pool = _Pool(ray, prepared, guard)
                tracker.workers = len(pool.actors)
                observer.notice(f"Scale-out: {len(pool.actors)} worker(s) on {pool.where}"
                                + (f", {pool.threads} CPU thread(s) each." if pool.threads else ", one GPU each."))
                pool.check_and_load(observer, prepared.run_dir.path)
                tracker.hosts = pool.hosts
                _run_rounds(prepared, pool, sink, tracker, tmp, observer)
            sink.commit()
        except BaseException as exc:
            if isinstance(exc, UsageError) and guard.pending is None:
                # the same command would be refused again (an engine that cannot start, say): nothing to
                # resume, so the run directory goes unless rows were committed to it (as in one process)
                sink.salvage()
                discard_new_checkpoint(prepared)
            raise_stopped(exc, guard, sink, tracker, lambda: (  # the workers' commits too (read, not verified)
                f"{sum(r['rows'] for r in read_commit_records(prepared.run_dir.path)[0])} of "
                f"{prepared.total_rows} rows are committed in {prepared.run_dir.path}; run the same command "
                "again to resume."
            ))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            observer.finish()  # (also when it never started: then it does nothing)
        if not prepared.committed.done.all():
            missing = int((~prepared.committed.done).sum())
            raise tracker.stopped(BatchLLMError(
                f"{missing} rows have no committed result after the workers stopped; run the same command again."))
        return write_output(prepared, tracker.model, guard, tracker)
    finally:
        if pool is not None:
            pool.close()  # after the report: stopping Ray is no part of the job's time


def _run_rounds(prepared: PreparedRun, pool: _Pool, sink: Any, tracker: ScaleOutTracker, tmp: Path,
                observer: RunObserver) -> None:
    """Plan and partition the rows left over the replicas up, run the parts; again after a replica died."""
    assert prepared.run_dir is not None
    fruitless = 0
    while not prepared.committed.done.all():
        if not pool.alive:
            raise BatchLLMError("Every worker died; run the same command again to resume.")
        before = prepared.committed.rows
        started = time.perf_counter()
        try:
            plan = _plan(prepared, prepared.committed.done, sink, pool.alive, tmp, pool.ray.put)
        except BaseException:
            if tracker.partition is None:  # stopped during the first plan: that time is still plan_s
                tracker.plan_stats.append(PlanStats(plan_s=time.perf_counter() - started))
            raise
        if tracker.partition is None:
            tracker.partition = plan.partition
            tracker.plan_stats.append(plan.stats)
        pool.wait_loaded()
        if not tracker.rounds:  # generation starts when every model is loaded (planning overlapped it)
            tracker.load_s = time.perf_counter() - pool.t0
            tracker.begin_generation()
            observer.start(prepared.total_rows, tracker.resumed, tracker.snapshot)
        tracker.model = pool.model
        tracker.rounds += 1
        if not plan.parts:
            break  # every row left failed before the engine (committed by the driver)
        seq = prepared.committed.next_seq
        refs = {pool.actors[k].run.remote(part.ref, seq): (k, part.row_ids) for part, k in zip(plan.parts, plan.replicas)}
        dead = _wait_round(pool, refs, prepared.committed, tracker)
        if prepared.settings.prefix_sharing == "plan":  # the replicas fed their parts in chunks
            tracker.plan_stats[0] = dataclasses.replace(
                tracker.plan_stats[0], chunks=sum(c.chunks for c in tracker.live.values()))
        if dead:
            # Nothing writes to the run directory now: reread it, the dead replicas' shards included.
            old = {s.name for s in prepared.committed.shards}
            prepared.committed = prepared.run_dir.load_committed(prepared.total_rows)
            sink.committed = prepared.committed
            for k in dead:
                tag = f"-w{k:03d}."
                tracker.died(k, shard_counts([s for s in prepared.committed.shards
                                               if s.name not in old and tag in s.name]))
            pool.revive(dead)
        fruitless = fruitless + 1 if prepared.committed.rows == before else 0
        if fruitless >= MAX_FRUITLESS_ROUNDS:
            raise BatchLLMError("The workers died without committing a row twice in a row; run the same command "
                                "again to resume.")


def _wait_round(pool: _Pool, refs: dict[Any, tuple[int, np.ndarray]], committed: Committed,
                tracker: ScaleOutTracker) -> list[int]:
    """Wait for every part, reading the replicas' progress meanwhile; the replicas whose process died."""
    ray = pool.ray
    dead: list[int] = []
    pending = list(refs)
    asked: dict[Any, int] = {}  # progress calls in flight -> replica
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
        for ref in ready:
            k, part_rows = refs[ref]
            try:
                report: WorkerReport = ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(k)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            for info in report.shards:
                committed.shards.append(info)
                committed.next_seq = max(committed.next_seq, info.seq + 1)
            committed.done[part_rows] = True  # the replica returns once all of them are committed
            tracker.finished_part(k, report.counts)
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=0) if asked else ([], [])
        for ref in answered:
            k = asked.pop(ref)
            try:
                counts = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # the replica died: its `run` says so
            if any(refs[r][0] == k for r in pending):  # not finished meanwhile (its report is newer)
                tracker.update(k, counts)
        for k in {refs[r][0] for r in pending} - set(asked.values()):
            asked[pool.actors[k].progress.remote()] = k
    return dead
