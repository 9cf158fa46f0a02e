"""The engine's CPU thread policy: OpenMP threads that spin briefly, then sleep, while they wait.

PyTorch's CPU ops run on an OpenMP pool (GNU libgomp in the pip wheels). By default a waiting
thread spins for a while, and every op ends at a barrier that waits for the pool's slowest thread.
When another process holds one of the cores (a second job, a test run, a `while 1: pass`), the
thread on that core gets a time slice only now and then, and each of the thousands of small ops
of a step waits for it: measured on a 2-core VM under load, an elementwise op on a [2048, 256]
tensor took 8-15 ms with two spinning threads against 0.3-0.9 ms with `OMP_WAIT_POLICY=PASSIVE`
(engine level, same load: a doc-QA job 48.7 s spinning vs 4.5 s passive; bench/thread_policy.py
compares the settings with and without a busy-loop hog: passive lost least to it).

So the engine asks OpenMP for passive waiting after a short spin (`GOMP_SPINCOUNT=20000`, tens of
microseconds: a thread waiting between two ops of a step is still awake for the next one, 8-16%
faster than sleeping at once on cores the job has to itself), and while it runs it uses as many
threads as the CPUs other processes leave it (engine/thread_governor.py): one thread on a shared
machine never spins against a partner that lost its core. libgomp reads its environment once, when
torch is imported: `configure_openmp_env` must run before that (engine/__init__.py calls it first);
if torch was imported earlier, it changes nothing.

User overrides: an `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` already set is kept; `BATCHLLM_NUM_THREADS=N`
(or `OMP_NUM_THREADS`) fixes the intra-op threads (default: the CPUs in this process's affinity mask,
as OpenMP counts them, fewer while other processes keep some of them busy). With any of the four set,
no spin count is added: a fixed thread count has no governor to step back under load (`--workers`
replicas get BATCHLLM_NUM_THREADS).
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

THREADS_ENV = "BATCHLLM_NUM_THREADS"
SPIN_COUNT = "20000"  # GOMP_SPINCOUNT: spin this many rounds (tens of microseconds), then sleep


def thread_count_fixed(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether the user fixed the thread count (BATCHLLM_NUM_THREADS or OMP_NUM_THREADS): then the engine
    has no thread governor (engine/thread_governor.py) and its threads do not spin."""
    return any(environ.get(name, "").strip() for name in (THREADS_ENV, "OMP_NUM_THREADS"))


def configure_openmp_env(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Ask for passive OpenMP waiting, after a short spin (GOMP_SPINCOUNT) unless the user chose the
    waiting or the thread count (spinning without the governor collapses under load); returns whether
    it can still take effect (torch, and so OpenMP, not loaded yet)."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ and not thread_count_fixed(environ):
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def requested_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """The thread count asked for in BATCHLLM_NUM_THREADS, or None. Raises ValueError for a value
    that is not a positive integer."""
    raw = environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r} is not a positive number of threads; unset it or give e.g. 2.")
    return int(raw)


def apply_thread_count() -> int:
    """Set torch's intra-op threads from BATCHLLM_NUM_THREADS (if set); returns the count in use."""
    import torch

    n = requested_threads()
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
