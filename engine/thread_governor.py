"""How many CPU threads the engine uses while it runs: as many as the CPUs other processes leave it.

The engine's OpenMP threads spin briefly before they sleep (engine/threads.py): on cores the job has to
itself that is 8-16% faster than sleeping at once, since every parallel step would otherwise wait for a
sleeping thread to wake; but when another busy process shares the cores, a spinning thread burns the
time slice its partner needs, and the engine slowed 2.5-3.4x
(bench/results/thread_policy_cpu_session11_spin.json). With this governor: 1.7-1.8x, the same times
under load as sleeping at once (bench/results/thread_policy_cpu_session11_governor.json).
So while it runs, the engine watches its CPUs: every INTERVAL_S of steps it reads how busy they were
(/proc/stat, per CPU it may run on) and how much of that was its own process (CPU time), and gives
itself as many threads as the CPUs the others left, at least one, at most one per CPU: fewer at once
(the first interval counts from the engine's start, so a busy machine is seen at the first step),
more only after two intervals in a row agree. One thread on a free core does not wait for anyone.

Only where the thread count is the engine's own choice: BATCHLLM_NUM_THREADS (which `--workers` sets
for each replica) or OMP_NUM_THREADS fixes it, and without /proc/stat (not Linux) nothing changes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

INTERVAL_S = 0.2
PROC_STAT = "/proc/stat"
# /proc/stat's time fields that are not idle: user nice system (idle iowait) irq softirq steal
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    busy_s: float  # the watched CPUs' busy time since boot, all processes
    own_s: float  # this process's CPU time


def busy_seconds(stat_text: str, cpus: Iterable[int], ticks_per_s: float) -> float:
    """Busy time of `cpus` since boot from /proc/stat's per-CPU lines (`cpuN user nice system idle
    iowait irq softirq steal ...`, in clock ticks); steal (a hypervisor's other guests) counts as busy."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            fields = [int(x) for x in rest.split()]
            total += sum(fields[i] for i in _BUSY_FIELDS if i < len(fields))
    return total / ticks_per_s


def threads_left(before: CpuSample, after: CpuSample, cpus: int, most: int) -> int:
    """The thread count the CPUs leave: cpus minus what other processes used, rounded to whole CPUs
    (a process using less than half of one takes no thread away), between 1 and `most`."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return most
    others = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / wall
    return max(1, min(most, math.floor(cpus - others + 0.5)))


class ThreadGovernor:
    """Call `tick()` once per engine step; it returns a new thread count when one applies (the caller
    sets it), else None."""

    def __init__(self, cpus: list[int], most: int, sample: Callable[[], CpuSample],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cpus, self.most, self._sample, self._clock = cpus, most, sample, clock
        self.threads = most
        self._last = sample()
        self._pending: int | None = None

    @staticmethod
    def for_this_process() -> ThreadGovernor | None:
        """A governor over the CPUs this process may run on, one thread each at most, or None where
        /proc/stat is not readable."""
        def sample() -> CpuSample:
            with open(PROC_STAT, encoding="ascii") as f:
                text = f.read()
            return CpuSample(time.monotonic(), busy_seconds(text, cpus, ticks), time.process_time())

        try:
            cpus = sorted(os.sched_getaffinity(0))
            ticks = float(os.sysconf("SC_CLK_TCK"))
            return ThreadGovernor(cpus, len(cpus), sample)  # its first sample reads /proc/stat
        except (AttributeError, OSError, ValueError):
            return None

    def tick(self) -> int | None:
        if self._clock() - self._last.wall_s < INTERVAL_S:
            return None
        now = self._sample()
        target = threads_left(self._last, now, len(self.cpus), self.most)
        self._last = now
        if target == self.threads:
            self._pending = None
            return None
        if target > self.threads and self._pending != target:  # more threads: after a second interval
            self._pending = target
            return None
        self._pending = None
        self.threads = target
        return target
