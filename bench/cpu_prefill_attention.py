"""Prefill attention on CPU: the compiled kernel (kernels/cpu_prefill.py) against the PyTorch path it
replaces (kernels/paged_attention_torch.py: gather a chunk's keys from the cache, PyTorch's fused
attention), per call of one layer.

    PYTHONPATH=. python bench/cpu_prefill_attention.py [--rounds 5] [--calls 10] [--label cpu]

Cases (a step's prefill spans over a paged cache of 16-token blocks, shuffled): whole prompts of 128,
500 and 1,000 tokens; a 300-token chunk continuing a 700-token context; 8 prompts of 120 tokens in one
step; at the vs-vLLM model's heads (4 query / 2 KV heads of 64) and a 1B model's (32 / 8 of 64) and
an 8B model's (32 / 8 of 128); float32, and bfloat16 where the CPU has it natively. Rounds alternate
the two paths (A B, B A, ...); each round keeps the fastest of `--calls` calls. Reported per case:
min and median milliseconds over rounds, GFLOP/s of the causal work (4 x head_dim x heads per visible
query-key pair) and the speedup of the medians. Writes bench/results/cpu_prefill_attention_<label>.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import engine  # noqa: E402,F401  (first: its OpenMP thread policy must precede torch's import)
import torch  # noqa: E402

sys.path.append(str(REPO / "bench"))  # appended: bench/kernels.py must not shadow the kernels package

from bench_common import cpu_run_header, results_path, write_results  # noqa: E402
from engine.devices import cpu_has_native_bf16  # noqa: E402
from kernels import cpu_library  # noqa: E402
from kernels.paged_attention import build_paged_batch  # noqa: E402
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch  # noqa: E402

BLOCK = 16
HEADS = {"small (4/2 x 64)": (4, 2, 64), "1b (32/8 x 64)": (32, 8, 64), "8b (32/8 x 128)": (32, 8, 128)}
SPANS = {"prompt 128": [(128, 128)], "prompt 500": [(500, 500)], "prompt 1000": [(1000, 1000)],
         "chunk 300 of 1000": [(300, 1000)], "8 prompts x 120": [(120, 120)] * 8}


def case(spans: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    rng = random.Random(0)
    need = [-(-ctx // BLOCK) for _, ctx in spans]
    ids = list(range(sum(need)))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range(n)] for n in need]
    k_cache = torch.randn(sum(need), BLOCK, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(ql for ql, _ in spans), heads, head_dim).to(dtype)
    batch = build_paged_batch([ql for ql, _ in spans], [c for _, c in spans], tables, BLOCK, torch.device("cpu"))
    return q, k_cache, v_cache, batch


def fastest_ms(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--label", default="cpu")
    args = parser.parse_args()
    if cpu_library.native_library_problem() is not None:
        print(f"no compiled kernel here: {cpu_library.native_library_problem()}", file=sys.stderr)
        return 2
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    rows = []
    for dtype in dtypes:
        for heads_name, (heads, kv_heads, head_dim) in HEADS.items():
            for spans_name, spans in SPANS.items():
                q, k_cache, v_cache, batch = case(spans, heads, kv_heads, head_dim, dtype)
                out = torch.empty_like(q)
                scale = head_dim**-0.5

                def compiled() -> None:
                    paged_attention_torch(q, k_cache, v_cache, plan_paged_torch(batch), scale, out)

                def pytorch() -> None:
                    with mock.patch.object(cpu_library, "native_library", lambda: None):
                        paged_attention_torch(q, k_cache, v_cache, plan_paged_torch(batch), scale, out)

                paths = {"compiled": compiled, "pytorch": pytorch}
                times: dict[str, list[float]] = {k: [] for k in paths}
                for r in range(args.rounds):
                    for key in (list(paths) if r % 2 == 0 else list(reversed(paths))):
                        times[key].append(fastest_ms(paths[key], args.calls))
                pairs = sum(sum(ctx - ql + i + 1 for i in range(ql)) for ql, ctx in spans)
                flop = 4 * head_dim * heads * pairs
                row = {"dtype": str(dtype).removeprefix("torch."), "heads": heads_name, "spans": spans_name}
                for key, ts in times.items():
                    med = statistics.median(ts)
                    row[key] = {"ms_min": round(min(ts), 3), "ms_median": round(med, 3),
                                "gflops_median": round(flop / med / 1e6, 1)}
                row["speedup_median"] = round(row["pytorch"]["ms_median"] / row["compiled"]["ms_median"], 2)
                rows.append(row)
                print(f"{row['dtype']:9s} {heads_name:16s} {spans_name:18s} compiled {row['compiled']['ms_median']:8.3f} ms "
                      f"pytorch {row['pytorch']['ms_median']:8.3f} ms  x{row['speedup_median']}", file=sys.stderr)
    result = {**cpu_run_header("cpu_prefill_attention", args.rounds),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "calls_per_round": args.calls,
              "block_size": BLOCK, "cases": rows}
    write_results(results_path("cpu_prefill_attention", args.label), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
