"""What the benchmarks share: timing, the device's copy bandwidth, provenance, result files, cached model dirs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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


def cpu_run_header(bench: str, rounds: int) -> dict:
    """What a CPU bench's results file starts with: when, where, which torch and threads, the load
    (the machine may be shared), which code."""
    import datetime as dt
    import platform

    return {"bench": bench, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "git": git_commit("engine", "kernels"), "rounds": rounds,
            "note": "shared machine: other processes may run alongside (see load_average)"}


def results_path(bench_name: str, device_name: str) -> Path:
    """bench/results/<bench>_<device name as a slug>.json"""
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    return REPO / "bench" / "results" / f"{bench_name}_{slug}.json"


def write_results(path: Path, result: Any) -> Path:
    """The results file, JSON; says where it went on stderr."""
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def cached_dir(target: Path, build: Callable[[Path], object], done_file: str = "model.safetensors") -> Path:
    """`target`, built once by `build(tmp)` in a temporary sibling renamed into place, so an interrupted
    build is never reused."""
    if (target / done_file).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
