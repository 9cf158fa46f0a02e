"""Host work of the CPU engine on a vs-vLLM job: the engine's Python (scheduling, step metadata, the
model's glue, sampling bookkeeping) with the compute taken out.

The job runs with every compute kernel replaced by a stand-in: linear layers return an empty tensor of
their output shape (the output head zeros, so greedy sampling sees no NaN), the fused RMSNorm / RoPE /
SiLU-multiply return their input's shape, KV stores and attention write nothing. With EOS ignored the
engine takes exactly the real job's steps whatever the tokens. On this 2-core machine the second core
waits while the host works, so this time adds to a job's; in a real run it costs about 1.5-2x as much
again (the kernels evict the interpreter's working set from the caches between steps).

    PYTHONPATH=. python bench/cpu_host_work.py [--jobs docqa-160 nosharing] [--modes plan none]
        [--rounds 6] [--tree DIR] [--out FILE]

--tree measures the engine of another checkout (an A/B of two commits with this same script).
Reports min and median over the rounds after a first (warm-up) one.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stub_kernels() -> None:
    """Replaces the CPU engine's compute kernels by stand-ins of the same output shapes."""
    import torch

    import kernels.group_prefill_torch as group_prefill
    import kernels.paged_attention_torch as paged
    import kernels.shared_prefix_torch as shared_prefix
    from engine.models import decoder, packed_linear
    from kernels import cpu_fused

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        return torch.zeros(rows, self.out_features) if self.out_features > 4096 else torch.empty(rows, self.out_features)

    packed_linear.PackedLinear.forward = linear
    decoder.native_rms_norm = lambda x, weight, eps, residual=None: (x, residual)
    decoder.native_silu_mul = lambda gate_up: torch.empty(gate_up.shape[0], gate_up.shape[1] // 2)
    decoder.native_rope = lambda x, positions, table: x
    cpu_fused.native_store_kv = lambda *args, **kwargs: None
    for module in (paged, group_prefill):
        module.native_prefill = lambda q, k_cache, v_cache, spans, scale, out, *args, **kwargs: out
    for module in (paged, shared_prefix):
        module.native_decode = lambda q, k_cache, v_cache, rows, scale, out, *args, **kwargs: out


def measure(job: str, mode: str, rounds: int) -> dict:
    from engine.config import EngineConfig
    from engine.demo_model import default_cache_root
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer
    from vs_vllm import JOBS, ensure_model, job_token_ids, kv_bytes_per_token

    spec = JOBS[job]
    model_dir = ensure_model(default_cache_root())
    tokenizer = Tokenizer(model_dir)
    prompts = job_token_ids(spec, tokenizer)
    config = EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32", prefix_sharing=mode,
                          kv_cache_memory=spec.kv_tokens * kv_bytes_per_token(model_dir),
                          kv_cache_tokens=spec.kv_tokens)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    seconds, steps = [], 0
    for _ in range(rounds + 1):
        engine = LLMEngine(config)
        start = time.perf_counter()
        for _result in engine.generate((i, p, params) for i, p in enumerate(prompts)):
            pass
        seconds.append(time.perf_counter() - start)
        steps = engine.stats().steps
    timed = seconds[1:]
    return {"job": job, "mode": mode, "steps": steps, "rows": len(prompts), "min_s": round(min(timed), 4),
            "median_s": round(statistics.median(timed), 4), "per_step_ms": round(min(timed) / steps * 1e3, 3),
            "rounds_s": [round(s, 4) for s in seconds]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=["docqa-160", "nosharing"])
    p.add_argument("--modes", nargs="+", choices=["plan", "lru", "none"], default=["plan", "none"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tree", type=Path, default=REPO, help="the checkout whose engine runs (default: this one)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_host_work_cpu.json")
    args = p.parse_args()
    tree = args.tree.resolve()
    sys.path[:0] = [str(tree), str(REPO / "bench")]
    from bench_common import cpu_run_header, write_results

    stub_kernels()
    results = [measure(job, mode, args.rounds) for job in args.jobs for mode in args.modes]
    for r in results:
        print(f"{r['job']:10s} {r['mode']:5s} {r['steps']:4d} steps: host {r['min_s'] * 1e3:.1f} ms min, "
              f"{r['median_s'] * 1e3:.1f} ms median ({r['per_step_ms']:.2f} ms/step)")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    write_results(args.out, {**cpu_run_header("cpu_host_work", args.rounds), "tree": str(tree),
                             "tree_commit": commit, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
