"""Decode attention on CPU: the compiled kernel (kernels/cpu_decode.py) vs the PyTorch paths it replaces.

    PYTHONPATH=. python bench/cpu_decode_attention.py [--rounds 15] [--out FILE]

One layer's decode attention for a step, timed per call (min and median over --rounds calls, the
two paths interleaved), float32 and bfloat16, on the vs-vLLM model's attention shape (4 query heads,
2 KV heads of 64) and a 1B-class shape (32 / 8 heads of 64) unless --shapes says otherwise:
  none:   R decode rows without groups (kernels.paged_attention_torch vs the kernel), block tables
          shuffled over a cache twice the job's size, contexts of L - (i * 7 % 50) keys;
  groups: G groups of M members sharing an L-token prefix (whole blocks), each with its own S-token suffix
          (kernels.shared_prefix_torch vs the kernel).
Also checks both against the float32 definition (max abs error). Writes bench/results/cpu_decode_attention_cpu.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kernels import cpu_decode, cpu_library  # noqa: E402
from kernels.paged_attention import build_paged_batch, paged_attention_reference  # noqa: E402
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch  # noqa: E402
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference  # noqa: E402
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch  # noqa: E402

BLOCK = 16
SHAPES = {"4x2x64": (4, 2, 64), "32x8x64": (32, 8, 64)}


def _timed(fn: Callable[[], object], pytorch: bool, rounds: int) -> list[float]:
    times = []
    real = cpu_library.native_library
    for _ in range(rounds):
        if pytorch:
            cpu_library.native_library = lambda: None  # type: ignore[assignment]
        try:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        finally:
            cpu_library.native_library = real  # type: ignore[assignment]
    return times


def _cache(blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype), torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype))


def case_none(rows: int, keys: int, shape: tuple[int, int, int], dtype: torch.dtype):
    heads, kv_heads, head_dim = shape
    lens = [max(1, keys - (i * 7) % 50) for i in range(rows)]
    need = sum(-(-n // BLOCK) for n in lens)
    ids = list(range(2 * need))
    random.Random(0).shuffle(ids)
    tables, at = [], 0
    for n in lens:
        tables.append(ids[at: at + -(-n // BLOCK)])
        at += len(tables[-1])
    k, v = _cache(2 * need, kv_heads, head_dim, dtype)
    q = torch.randn(rows, heads, head_dim).to(dtype)
    batch = build_paged_batch([1] * rows, lens, tables, BLOCK, torch.device("cpu"))
    plan = plan_paged_torch(batch)
    out = torch.empty_like(q)
    scale = head_dim ** -0.5

    def run():
        return paged_attention_torch(q, k, v, plan, scale, out)
    ref = paged_attention_reference(q.float(), k.float(), v.float(), batch, scale)
    return run, ref, out


def case_groups(groups: int, members: int, prefix: int, suffix: int, shape: tuple[int, int, int], dtype: torch.dtype):
    heads, kv_heads, head_dim = shape
    rng = random.Random(1)
    per_prefix = -(-prefix // BLOCK)
    need = groups * per_prefix + groups * members * (-(-(prefix + suffix) // BLOCK) - prefix // BLOCK)
    ids = list(range(2 * need))
    rng.shuffle(ids)
    tables, ctx, gids, plens = [], [], [], []
    for g in range(groups):
        shared = [ids.pop() for _ in range(prefix // BLOCK)]
        for _ in range(members):
            own = [ids.pop() for _ in range(-(-(prefix + suffix) // BLOCK) - len(shared))]
            tables.append(shared + own)
            ctx.append(prefix + suffix)
            gids.append(g)
            plens.append(prefix)
    k, v = _cache(2 * need, kv_heads, head_dim, dtype)
    rows = len(tables)
    q = torch.randn(rows, heads, head_dim).to(dtype)
    batch = build_shared_prefix_batch(list(range(rows)), ctx, tables, gids, plens, BLOCK, "cpu")
    plan = plan_shared_prefix_torch(batch, heads_per_kv=heads // kv_heads)
    out = torch.empty_like(q)
    scale = head_dim ** -0.5

    def run():
        return shared_prefix_decode_torch(q, k, v, plan, scale, out=out)
    ref = shared_prefix_decode_reference(q.float(), k.float(), v.float(), batch, scale)
    return run, ref, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_decode_attention_cpu.json")
    args = p.parse_args(argv)
    from bench_common import git_commit, write_results

    problem = cpu_library.native_library_problem()
    if problem is not None:
        print(f"the compiled kernel is not available: {problem}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    cases = {
        "none 64 rows x 512 keys": lambda s, d: case_none(64, 512, s, d),
        "none 192 rows x 528 keys": lambda s, d: case_none(192, 528, s, d),
        "none 16 rows x 1200 keys": lambda s, d: case_none(16, 1200, s, d),
        "groups 10 x 16 members, prefix 800 + suffix 60": lambda s, d: case_groups(10, 16, 800, 60, s, d),
        "groups 48 x 2 members, prefix 1152 + suffix 90": lambda s, d: case_groups(48, 2, 1152, 90, s, d),
        "groups 2 x 64 members, prefix 304 + suffix 20": lambda s, d: case_groups(2, 64, 304, 20, s, d),
    }
    results = []
    for shape_name in args.shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for name, make in cases.items():
                run, ref, out = make(SHAPES[shape_name], dtype)
                errs = {}
                for label, pytorch in (("pytorch", True), ("native", False)):
                    _timed(run, pytorch, 2)
                    errs[label] = float((out.float() - ref).abs().max())
                times: dict[str, list[float]] = {"pytorch": [], "native": []}
                for r in range(args.rounds):
                    for label in (("pytorch", "native") if r % 2 == 0 else ("native", "pytorch")):
                        times[label] += _timed(run, label == "pytorch", 1)
                row = {"shape": shape_name, "dtype": str(dtype).removeprefix("torch."), "case": name}
                for label, ts in times.items():
                    row[f"{label}_ms_min"] = round(min(ts) * 1e3, 3)
                    row[f"{label}_ms_median"] = round(statistics.median(ts) * 1e3, 3)
                    row[f"{label}_max_abs_err"] = errs[label]
                row["speedup_median"] = round(row["pytorch_ms_median"] / row["native_ms_median"], 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    write_results(args.out, {
        "benchmark": "cpu_decode_attention", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/cpu_decode_attention.py", *(argv if argv is not None else sys.argv[1:])]),
        "git": git_commit("kernels"), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                  "threads": torch.get_num_threads()},
        "loadavg_1m": os.getloadavg()[0], "results": results,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
