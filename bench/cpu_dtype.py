"""float32 vs bfloat16 on this CPU: the engine end to end, and the matmuls and attention under it.

    PYTHONPATH=. python bench/cpu_dtype.py [--rounds 3] [--models small wide] [--out FILE]

Why: `--dtype auto` runs a half-precision checkpoint in bfloat16 on a CPU with native bfloat16 (AMX
or AVX-512 BF16) and in float32 elsewhere; this measures what that choice is worth here.

Ops: F.linear at a step's shapes (1,024 and 64 rows) and causal SDPA of one 512-token prompt, each
in both dtypes (min and median of 30 calls).
Engine: random-weight Llama-shaped models saved as bfloat16 checkpoints (small: 4 layers, hidden
256, the vs-vLLM shape; wide: 2 layers of a 1B model's width: hidden 2,048, 16/8 heads of 128,
intermediate 5,632), two jobs each (bench/e2e_paper.py's `Workload`, prompts shuffled, 32 greedy
tokens per row, EOS ignored): docqa (plan mode, 4 documents of 800 tokens x 8 questions of 30) and
nosharing (none mode, 32 distinct 500-token prompts). One warm engine per (model, job, dtype); rounds
interleave the dtypes (A B, B A, ...) and time `generate` only. Reported: seconds per round, min,
median, the bfloat16 speedup of the medians, and the fraction of rows whose tokens equal float32's
(bfloat16 rounding flips near-tied tokens of a random model, so it is below 1).
Writes bench/results/cpu_dtype_<label>.json (--label, default "cpu").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import engine  # noqa: E402,F401  (first: its OpenMP thread policy must precede torch's import)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))

from bench_common import git_commit, results_path, write_results  # noqa: E402
from e2e_paper import ModelSpec, Workload, ensure_model_dir  # noqa: E402

from engine.devices import cpu_has_native_bf16  # noqa: E402

MODELS = {
    "small": ModelSpec("cpu-small", hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768,
                       vocab=8192, max_positions=4096, rope_original_max=4096, init_std=0.02),
    "wide": ModelSpec("cpu-wide", hidden=2048, layers=2, heads=16, kv_heads=8, head_dim=128, intermediate=5632,
                      vocab=8192, max_positions=4096, rope_original_max=4096, init_std=0.02),
}
JOBS = {
    "docqa": ("plan", Workload(groups=4, degree=8, prefix=800, suffix=30, output=32, seed=0)),
    "nosharing": ("none", Workload(groups=32, degree=1, prefix=1, suffix=499, output=32, seed=1)),
}
DTYPES = ("float32", "bfloat16")


def timed(fn, calls: int = 30) -> dict[str, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_ms": round(min(times) * 1e3, 3), "median_ms": round(statistics.median(times) * 1e3, 3)}


def op_rates() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, (rows, k, n) in {"linear 1024x2048x8192": (1024, 2048, 8192), "linear 64x2048x8192": (64, 2048, 8192),
                               "linear 1024x256x1536": (1024, 256, 1536)}.items():
        out[name] = {}
        for dtype in DTYPES:
            x = torch.randn(rows, k, dtype=getattr(torch, dtype))
            w = torch.randn(n, k, dtype=getattr(torch, dtype))
            out[name][dtype] = timed(lambda: F.linear(x, w))
    out["sdpa causal 512 tokens, 16 heads of 128"] = {}
    for dtype in DTYPES:
        q = torch.randn(1, 16, 512, 128, dtype=getattr(torch, dtype))
        out["sdpa causal 512 tokens, 16 heads of 128"][dtype] = timed(
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    for r in out.values():
        r["bf16_speedup_median"] = round(r["float32"]["median_ms"] / r["bfloat16"]["median_ms"], 2)
    return out


def make_engine(model_dir: Path, mode: str, w: Workload, dtype: str):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    kv_tokens = w.rows * (w.prefix + w.suffix + w.output + 32)
    return LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype=dtype, prefix_sharing=mode,
                                  kv_cache_tokens=kv_tokens))


def generate(llm, prompts: list[list[int]], output: int) -> tuple[float, list[list[int]]]:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    done = {r.key: list(r.token_ids) for r in llm.generate((i, p, params) for i, p in enumerate(prompts))}
    return time.perf_counter() - start, [done[i] for i in range(len(prompts))]


def engine_runs(models: list[str], rounds: int, root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model in models:
        spec = MODELS[model]
        model_dir = ensure_model_dir(spec, root, torch.device("cpu"), torch.bfloat16)
        for job, (mode, w) in JOBS.items():
            prompts = w.prompts(spec.vocab)
            engines = {d: make_engine(model_dir, mode, w, d) for d in DTYPES}
            warm = dataclasses.replace(w, groups=2, seed=w.seed + 7).prompts(spec.vocab)
            for e in engines.values():
                generate(e, warm, 4)
            seconds: dict[str, list[float]] = {d: [] for d in DTYPES}
            tokens: dict[str, list[list[int]]] = {}
            for r in range(rounds):
                for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                    s, tokens[d] = generate(engines[d], prompts, w.output)
                    seconds[d].append(round(s, 3))
                    print(f"{model} {job} round {r} {d}: {s:.2f}s", file=sys.stderr)
            med = {d: statistics.median(seconds[d]) for d in DTYPES}
            same = sum(a == b for a, b in zip(tokens["float32"], tokens["bfloat16"])) / len(prompts)
            out[f"{model} {job}"] = {
                "mode": mode, "workload": dataclasses.asdict(w), "model": dataclasses.asdict(spec),
                **{d: {"engine_s": seconds[d], "engine_s_min": min(seconds[d]), "engine_s_median": round(med[d], 3)}
                   for d in DTYPES},
                "bf16_speedup_median": round(med["float32"] / med["bfloat16"], 2),
                "bf16_speedup_min": round(min(seconds["float32"]) / min(seconds["bfloat16"]), 2),
                "rows_same_tokens_as_float32": round(same, 3),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="batchllm-cpu-dtype-") as tmp:
        ops = op_rates()
        runs = engine_runs(args.models, args.rounds, Path(tmp))
    result = {
        "bench": "cpu_dtype",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/cpu_dtype.py", *(argv if argv is not None else sys.argv[1:])]),
        "duration_s": round(time.time() - started, 1),
        "git": git_commit("engine", "kernels"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
                    "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "ops": ops,
        "engine": runs,
    }
    write_results(args.out or results_path("cpu_dtype", args.label), result)
    print(result["ops"], file=sys.stderr)
    for name, r in runs.items():
        print(f"{name}: float32 {r['float32']['engine_s_median']}s bfloat16 {r['bfloat16']['engine_s_median']}s "
              f"-> {r['bf16_speedup_median']}x (rows same: {r['rows_same_tokens_as_float32']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
