"""What the GPU benchmarks share: timing, the device's copy bandwidth, provenance, result paths."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


def timer(device: torch.device, warmup_ms: int, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn (CUDA: triton.testing.do_bench, which flushes L2 between runs)."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn: Callable[[], object]) -> float:
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

        return bench

    def bench_cpu(fn: Callable[[], object]) -> float:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return bench_cpu


def copy_bandwidth(device: torch.device, bench: Callable, gib: float) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3)


def git_commit(*watched: str) -> dict:
    """HEAD, and whether the watched paths (the code being measured) differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "kernels_dirty": bool(git("status", "--porcelain", "--", *watched))}


def results_path(bench_name: str, device_name: str) -> Path:
    """bench/results/<bench>_<device name as a slug>.json"""
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    return REPO / "bench" / "results" / f"{bench_name}_{slug}.json"
