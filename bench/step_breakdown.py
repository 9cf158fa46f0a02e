"""Where an engine run's time goes, for bench/e2e_paper.py --breakdown-rows: wall time per kind of
step, and the device time of the kernels it launched.

Every engine step ends with its sampled tokens on the host (a device sync), so a host clock around
`LLMEngine.step` measures the step's whole time, device and host, without adding a sync. The kernel
table comes from a second run under torch.profiler (its own overhead stays out of the step times).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


def _run(engine, rows: list[list[int]], tokens: int, on_step=None) -> None:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.add_planned([(i, r, params) for i, r in enumerate(rows)])
    while engine.has_unfinished():
        if on_step is None:
            engine.step()
        else:
            on_step()


def step_times(engine, rows: list[list[int]], tokens: int) -> dict:
    """{kind: {steps, total_s, median_ms}} for kinds `graph_decode` (decode steps replayed from a
    CUDA graph) and `other` (prefill and mixed steps, eager decode)."""
    times: dict[str, list[float]] = defaultdict(list)

    def one_step() -> None:
        graphs = engine.stats().graph_steps
        t = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t
        times["graph_decode" if engine.stats().graph_steps > graphs else "other"].append(seconds)

    _run(engine, rows, tokens, one_step)
    return {kind: {"steps": len(xs), "total_s": round(sum(xs), 4), "median_ms": round(sorted(xs)[len(xs) // 2] * 1e3, 3)}
            for kind, xs in times.items()}


def kernel_table(engine, rows: list[list[int]], tokens: int, device: torch.device, top: int = 15) -> dict:
    """The run's device time by kernel (self time, the `top` largest) and in all, and its wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        _run(engine, rows, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    if device.type == "cuda":
        timed = [(self_device_us(e), e) for e in events if self_device_us(e) > 0]
    else:  # no device: the ops' own CPU time
        timed = [(float(e.self_cpu_time_total), e) for e in events if not e.key.startswith("ProfilerStep")]
    timed.sort(key=lambda x: -x[0])
    total_us = sum(us for us, _ in timed)
    return {
        "profiled_wall_s": round(wall, 4),
        "device_time_s": round(total_us / 1e6, 4),
        "kernels": [{"name": e.key[:120], "calls": e.count, "self_s": round(us / 1e6, 4),
                     "share": round(us / total_us, 4) if total_us else None} for us, e in timed[:top]],
    }
