"""Linear layers on CPU: F.linear (PyTorch's dense path: MKL sgemm for float32) against oneDNN with the
weight packed once (kernels/cpu_linear.py, what the engine runs on a CPU).

    PYTHONPATH=. python bench/cpu_linear.py [--rounds 5] [--calls 20] [--label cpu]

Shapes: the layers of the 256-wide vs-vLLM model (qkv 256->512, o 256->256, gate+up 256->1280, down
640->256, output 256->8192) and of a 1B model (hidden 2,048: qkv 2048->3072, gate+up 2048->16384,
down 8192->2048, output 2048->32000), at a decode step's rows (1, 8, 64, 256) and a prefill step's
(1,024; the output projection only at decode rows: prefill keeps one row per prompt). float32 and
bfloat16 (skipped where this CPU has no native bfloat16: the engine does not pack it there).
Rounds interleave the two paths (A B, B A, ...); each round times `--calls` calls of each and keeps the
fastest; reported per shape: min and median over rounds in microseconds, GFLOP/s, and the speedup of
the medians. Writes bench/results/cpu_linear_<label>.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import engine  # noqa: E402,F401  (first: its OpenMP thread policy must precede torch's import)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.append(str(REPO / "bench"))  # appended: bench/kernels.py must not shadow the kernels package

from bench_common import cpu_run_header, results_path, write_results  # noqa: E402
from engine.devices import cpu_has_native_bf16  # noqa: E402
from kernels.cpu_linear import pack_linear_weight, packed_linear, packed_linear_problem  # noqa: E402

LAYERS = {
    "small.qkv": (256, 512), "small.o": (256, 256), "small.gate_up": (256, 1280), "small.down": (640, 256),
    "small.output": (256, 8192),
    "1b.qkv": (2048, 3072), "1b.gate_up": (2048, 16384), "1b.down": (8192, 2048), "1b.output": (2048, 32000),
}
DECODE_ROWS = (1, 8, 64, 256)
PREFILL_ROWS = 1024


def fastest_us(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--label", default="cpu")
    args = parser.parse_args()
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    cases = []
    for dtype in dtypes:
        problem = packed_linear_problem(dtype)
        if problem is not None:
            print(f"{dtype}: no packed linear here ({problem})", file=sys.stderr)
            continue
        for name, (inner, outer) in LAYERS.items():
            rows_list = DECODE_ROWS + (() if name.endswith("output") else (PREFILL_ROWS,))
            weight = torch.randn(outer, inner).to(dtype) * inner**-0.5
            packed = pack_linear_weight(weight)
            for rows in rows_list:
                x = torch.randn(rows, inner).to(dtype)
                paths = {"f_linear": lambda: F.linear(x, weight), "onednn_packed": lambda: packed_linear(x, packed)}
                for fn in paths.values():
                    fn()
                times: dict[str, list[float]] = {k: [] for k in paths}
                for r in range(args.rounds):
                    order = list(paths) if r % 2 == 0 else list(reversed(paths))
                    for key in order:
                        times[key].append(fastest_us(paths[key], args.calls))
                flop = 2 * rows * inner * outer
                row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "rows": rows, "in": inner,
                       "out": outer}
                for key, ts in times.items():
                    med = statistics.median(ts)
                    row[key] = {"us_min": round(min(ts), 1), "us_median": round(med, 1),
                                "gflops_median": round(flop / med / 1e3, 1)}
                row["speedup_median"] = round(row["f_linear"]["us_median"] / row["onednn_packed"]["us_median"], 2)
                cases.append(row)
                print(f"{row['dtype']:9s} {name:14s} rows {rows:5d}: F.linear {row['f_linear']['us_median']:9.1f} us "
                      f"packed {row['onednn_packed']['us_median']:9.1f} us  x{row['speedup_median']}", file=sys.stderr)
    result = {**cpu_run_header("cpu_linear", args.rounds), "processor": platform.processor() or platform.machine(),
              "cpu_model": _cpu_model(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "calls_per_round": args.calls, "cases": cases}
    write_results(results_path("cpu_linear", args.label), result)
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
