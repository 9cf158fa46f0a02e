"""The engine's CPU thread count follows the CPUs other processes leave it (engine/thread_governor.py):
/proc/stat read per CPU it may run on, its own CPU time taken out, two agreeing intervals per change."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.thread_governor import INTERVAL_S, CpuSample, ThreadGovernor, busy_seconds, threads_left

STAT = """cpu  500 0 300 9000 20 0 10 5 0 0
cpu0 100 0 50 4000 10 0 5 2 0 0
cpu1 200 0 100 4000 10 0 5 3 0 0
cpu2 200 0 150 1000 0 0 0 0 0 0
intr 12345
"""


def test_busy_seconds_counts_the_watched_cpus_and_steal_but_not_idle() -> None:
    # cpu0: user 100 + system 50 + softirq 5 + steal 2; cpu1: 200 + 100 + 5 + 3 (ticks of 1/100 s)
    assert busy_seconds(STAT, [0, 1], 100.0) == pytest.approx((157 + 308) / 100)
    assert busy_seconds(STAT, [2], 100.0) == pytest.approx(3.5)
    assert busy_seconds(STAT, [7], 100.0) == 0.0


def _sample(wall: float, busy: float, own: float) -> CpuSample:
    return CpuSample(wall, busy, own)


def test_threads_left_is_the_cpus_others_do_not_use() -> None:
    start = _sample(0.0, 0.0, 0.0)
    assert threads_left(start, _sample(1.0, 2.0, 2.0), cpus=2, most=2) == 2  # all busy time was ours
    assert threads_left(start, _sample(1.0, 2.0, 1.0), cpus=2, most=2) == 1  # a hog took one CPU
    assert threads_left(start, _sample(1.0, 1.4, 1.0), cpus=2, most=2) == 2  # 40% of a CPU takes none
    assert threads_left(start, _sample(1.0, 1.6, 1.0), cpus=2, most=2) == 1  # 60% of one takes one
    assert threads_left(start, _sample(1.0, 2.0, 0.0), cpus=2, most=2) == 1  # never fewer than one
    assert threads_left(start, _sample(1.0, 1.0, 0.0), cpus=4, most=2) == 2  # never more than most
    assert threads_left(start, _sample(0.0, 1.0, 0.0), cpus=2, most=2) == 2  # no time passed: no change


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_governor_drops_threads_at_once_and_adds_them_after_two_agreeing_intervals() -> None:
    clock = _Clock()
    others = [0.0]  # CPUs other processes keep busy from now on
    state = {"busy": 0.0, "own": 0.0, "last": 0.0}

    def sample() -> CpuSample:
        dt = clock.t - state["last"]
        state["last"] = clock.t
        state["own"] += dt * (2 - others[0])
        state["busy"] += dt * 2
        return CpuSample(clock.t, state["busy"], state["own"])

    gov = ThreadGovernor([0, 1], 2, sample, clock)
    steps: list[int | None] = []

    def run(intervals: int) -> None:
        for _ in range(intervals):
            clock.t += INTERVAL_S / 4
            steps.append(gov.tick())  # within the interval: nothing sampled
            clock.t += INTERVAL_S
            steps.append(gov.tick())

    run(2)
    assert gov.threads == 2 and all(s is None for s in steps)
    others[0] = 1.0  # a hog arrives: one interval is enough
    steps.clear()
    run(1)
    assert gov.threads == 1 and steps.count(1) == 1
    others[0] = 0.0  # it leaves: one interval is not enough to add a thread back
    steps.clear()
    run(1)
    assert gov.threads == 1 and all(s is None for s in steps)
    run(1)
    assert gov.threads == 2 and steps.count(2) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_an_engine_on_a_cpu_shared_with_a_busy_process_drops_to_the_free_cpus(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the thread count left to the engine, a busy-loop process on its CPUs takes threads away
    while it runs; with BATCHLLM_NUM_THREADS or OMP_NUM_THREADS set, the count is the user's."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("BATCHLLM_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    config = EngineConfig(model_dir=str(tiny_model_dir("llama_gqa")), device="cpu", dtype="float32")
    engine = LLMEngine(config)
    governor = engine.runner.thread_governor
    assert governor is not None and governor.threads == len(cpus) == torch.get_num_threads()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(cpus) - 1)]
    try:
        deadline = time.monotonic() + 20
        while governor.threads > 1 and time.monotonic() < deadline:
            engine.runner.run([])  # a step with nothing to compute still consults the governor
            time.sleep(0.05)
        assert governor.threads == 1 and torch.get_num_threads() == 1
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        torch.set_num_threads(before)
    monkeypatch.setenv("BATCHLLM_NUM_THREADS", "1")
    assert LLMEngine(config).runner.thread_governor is None
