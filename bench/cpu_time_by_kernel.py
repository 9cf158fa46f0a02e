"""Where a CPU engine job's time goes, by kind of kernel: a vs-vLLM job run in-process with a clock around
every call of each compute kernel (the linear layers, prefill / group-prefill / decode attention, the fused
elementwise steps, the KV store, sampling); the rest of the job's time is host work and small ops
(scheduling, step metadata, embedding, the model's glue).

    PYTHONPATH=. python bench/cpu_time_by_kernel.py [--job docqa-160] [--mode plan] [--dtype float32]
        [--hidden 256 --layers 4] [--rounds 4] [--label cpu]

Each round builds a fresh engine (its KV cache zero-filled first, as bench/vs_vllm.py's batchllm worker does)
and runs the job's `generate` (32 greedy tokens per row, EOS ignored); the first round is a warm-up.
Reported: median milliseconds per kind over the timed rounds, its share of the job, calls, and the linear
layers' GFLOP/s (2 x rows x in x out per call). Kernels run on the host's cores and return when done, so
a clock around each call measures it; the clocks add ~1 us per call (a few hundred calls per job).
Writes bench/results/cpu_time_by_kernel_<label>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import engine  # noqa: E402,F401  (first: its OpenMP thread policy must precede torch's import)

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
LINEAR_FLOP = [0]


def clocked(owner: Any, name: str, kind: str, count: Callable[..., int] | None = None) -> None:
    """Replaces owner.name by a wrapper that adds each call's seconds to SECONDS[kind]."""
    inner = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        SECONDS[kind] += time.perf_counter() - start
        CALLS[kind] += 1
        if count is not None:
            LINEAR_FLOP[0] += count(*args)
        return result

    setattr(owner, name, timed)


def clock_kernels() -> None:
    import engine.model_runner as runner
    import kernels.group_prefill_torch as group_prefill
    import kernels.paged_attention_torch as paged
    import kernels.shared_prefix_torch as shared_prefix
    from engine.models import decoder, packed_linear
    from kernels import cpu_fused

    clocked(packed_linear.PackedLinear, "forward", "linear layers",
            lambda layer, x: 2 * x.shape[0] * layer.in_features * layer.out_features)
    clocked(decoder, "native_rms_norm", "add + RMSNorm")
    clocked(decoder, "native_silu_mul", "SiLU x up")
    clocked(decoder, "native_rope", "RoPE")
    clocked(cpu_fused, "native_store_kv", "KV store")
    clocked(paged, "native_prefill", "prefill attention")
    clocked(group_prefill, "native_prefill", "group members' prefill attention")
    clocked(paged, "native_decode", "decode attention (no groups)")
    clocked(shared_prefix, "native_decode", "decode attention (groups)")
    clocked(runner, "sample", "sampling")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="docqa-160", help="a bench/vs_vllm.py job")
    p.add_argument("--mode", choices=("plan", "lru", "none"), default="plan")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--hidden", type=int, default=None, help="model width (default: vs_vllm.py's, 256)")
    p.add_argument("--layers", type=int, default=None, help="model layers (default: vs_vllm.py's, 4)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds after a warm-up one")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    clock_kernels()
    from bench_common import cpu_run_header, git_commit, results_path, write_results
    from engine.config import EngineConfig
    from engine.demo_model import default_cache_root
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer
    from vs_vllm import HIDDEN, JOBS, LAYERS, ensure_model, job_token_ids, kv_bytes_per_token

    spec = JOBS[args.job]
    shape = {"hidden": args.hidden or HIDDEN, "layers": args.layers or LAYERS}
    model_dir = ensure_model(default_cache_root(), shape["hidden"], shape["layers"])
    prompts = job_token_ids(spec, Tokenizer(model_dir))
    config = EngineConfig(model_dir=str(model_dir), device="cpu", dtype=args.dtype, prefix_sharing=args.mode,
                          kv_cache_memory=spec.kv_tokens * kv_bytes_per_token(model_dir, args.dtype),
                          kv_cache_tokens=spec.kv_tokens)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds + 1):
        eng = LLMEngine(config)
        eng.runner.kv_cache.zero_()
        SECONDS.clear()
        CALLS.clear()
        LINEAR_FLOP[0] = 0
        start = time.perf_counter()
        for _result in eng.generate((i, p, params) for i, p in enumerate(prompts)):
            pass
        rounds.append({"total_s": time.perf_counter() - start, "seconds": dict(SECONDS), "calls": dict(CALLS),
                       "linear_flop": LINEAR_FLOP[0], "steps": eng.stats().steps})
    timed = rounds[1:]
    total = statistics.median(r["total_s"] for r in timed)
    kinds = {}
    for kind in timed[0]["seconds"]:
        seconds = statistics.median(r["seconds"][kind] for r in timed)
        kinds[kind] = {"ms": round(seconds * 1e3, 1), "share": round(seconds / total, 3), "calls": timed[0]["calls"][kind]}
    rest = total - sum(k["ms"] for k in kinds.values()) / 1e3
    kinds["rest: host work, embedding, small ops"] = {"ms": round(rest * 1e3, 1), "share": round(rest / total, 3)}
    linear_s = statistics.median(r["seconds"]["linear layers"] for r in timed)
    linear_gflops = timed[0]["linear_flop"] / linear_s / 1e9
    print(f"{args.job} {args.mode} {args.dtype} hidden {shape['hidden']} x {shape['layers']} layers: "
          f"{total * 1e3:.1f} ms median over {len(timed)} rounds, {timed[0]['steps']} steps")
    for kind, k in kinds.items():
        print(f"  {kind:40s} {k['ms']:8.1f} ms  {100 * k['share']:5.1f}%" + (f"  {k['calls']} calls" if "calls" in k else ""))
    print(f"  linear layers: {linear_gflops:.0f} GFLOP/s")
    out = results_path("cpu_time_by_kernel", args.label)
    write_results(out, {**cpu_run_header("cpu_time_by_kernel", args.rounds),
                        "command": " ".join(["python", *sys.argv]), "git": git_commit("engine", "kernels"),
                        "job": args.job, "mode": args.mode, "dtype": args.dtype, "model": shape,
                        "threads": os.environ.get("BATCHLLM_NUM_THREADS"), "total_ms_median": round(total * 1e3, 1),
                        "rounds_ms": [round(r["total_s"] * 1e3, 1) for r in timed], "kinds": kinds,
                        "linear_gflops": round(linear_gflops), "linear_gflop_per_round": round(timed[0]["linear_flop"] / 1e9, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
