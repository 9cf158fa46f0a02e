"""Engine time on CPU, split into prefill and decode steps, for a plan-mode document-QA job and a
job without sharing (float32, greedy, EOS ignored), on a small random-weight Llama.

Model: 4 layers, hidden 256, 4 query / 2 KV heads of 64, vocab 8192 (the shape issue 11 measured
against vLLM). Workloads (bench/e2e_paper.py's `Workload`: G groups x d rows, a P-token shared
prefix per group and an S-token suffix per row, O output tokens, rows shuffled):
  docqa: 10 x 16, P=1000, S=24, O=16, prefix_sharing=plan, KV for the whole job;
  none:  the same prompts, prefix_sharing=none (raw prefill + decode, every prompt in full).
Each job gets a fresh engine and a warm-up run; then `--rounds` timed `generate` calls, the jobs
interleaved (A B A B: the machine is shared, so timings are noisy), reporting min and median.
A step counts as a decode step when every chunk has one token; its time is runner.run's.

    python bench/engine_cpu_profile.py [--rounds 3] [--jobs docqa none] [--profile docqa]

--profile JOB runs one more generate of JOB under cProfile and prints the top functions.
Writes bench/results/engine_cpu_profile_<label>.json (--label, default "cpu").
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import engine  # noqa: E402,F401  (first: its OpenMP thread policy must precede torch's import)
import torch  # noqa: E402
sys.path.insert(0, str(REPO / "bench"))

from bench_common import git_commit, results_path, write_results  # noqa: E402
from e2e_paper import ModelSpec, Workload, ensure_model_dir  # noqa: E402

CPU_MODEL = ModelSpec("cpu-small", hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64,
                      intermediate=768, vocab=8192, max_positions=4096, rope_original_max=4096, init_std=0.02)
JOBS = {
    "docqa": ("plan", Workload(groups=10, degree=16, prefix=1000, suffix=24, output=16, seed=0)),
    "none": ("none", Workload(groups=10, degree=16, prefix=1000, suffix=24, output=16, seed=0)),
}


@dataclasses.dataclass
class StepTimes:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0


def make_engine(model_dir: Path, mode: str, w: Workload, args: argparse.Namespace):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    kv_tokens = w.rows * (w.prefix + w.suffix + w.output + 32)
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), device="cpu", dtype="float32", prefix_sharing=mode,
        max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
        kv_cache_memory=kv_tokens * CPU_MODEL.kv_bytes_per_token(4), attention_backend="torch"))


def timed_runner(engine) -> StepTimes:
    """Wrap engine.runner.run to add each step's time to the returned counters."""
    times = StepTimes()
    run = engine.runner.run

    def wrapped(chunks, *rest):  # rest: the runner's other arguments (block copies, grammar masks)
        t = time.perf_counter()
        out = run(chunks, *rest)
        dt_s = time.perf_counter() - t
        if all(c.num_tokens == 1 for c in chunks):
            times.decode_s += dt_s
            times.decode_steps += 1
            times.decode_tokens += len(chunks)
        else:
            times.prefill_s += dt_s
            times.prefill_steps += 1
        return out

    engine.runner.run = wrapped
    return times


def generate(engine, prompts: list[list[int]], output: int, times: StepTimes) -> dict:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    before = engine.stats()
    for f in dataclasses.fields(StepTimes):
        setattr(times, f.name, type(getattr(times, f.name))())
    t = time.perf_counter()
    done = {r.key: r for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    seconds = time.perf_counter() - t
    after = engine.stats()
    prefill_tokens = after.prefill_tokens - before.prefill_tokens
    outputs = [list(done[i].token_ids) for i in range(len(prompts))]
    return {
        "engine_s": seconds,
        "prefill_step_s": times.prefill_s,
        "decode_step_s": times.decode_s,
        "prefill_tokens": prefill_tokens,
        "prefill_tok_per_s": prefill_tokens / times.prefill_s if times.prefill_s else 0.0,
        "decode_tok_per_s": times.decode_tokens / times.decode_s if times.decode_s else 0.0,
        "prefill_steps": times.prefill_steps,
        "decode_steps": times.decode_steps,
        "outputs": outputs,
    }


def summarize(runs: list[dict]) -> dict:
    keys = ("engine_s", "prefill_step_s", "decode_step_s", "prefill_tok_per_s", "decode_tok_per_s")
    out = {f"{k}_min": round(min(r[k] for r in runs), 4) for k in keys}
    out |= {f"{k}_median": round(statistics.median(r[k] for r in runs), 4) for k in keys}
    out |= {k: runs[0][k] for k in ("prefill_tokens", "prefill_steps", "decode_steps")}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["docqa", "none"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--groups", type=int, default=None, help="documents per job (default 10)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--profile", choices=sorted(JOBS), default=None, help="cProfile one more run of this job")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--label", default="cpu", help="result file suffix")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="batchllm-cpu-profile-")
    model_dir = ensure_model_dir(CPU_MODEL, Path(tmp.name), torch.device("cpu"), torch.float32)
    engines, prompts, warm, work = {}, {}, {}, {}
    for job in args.jobs:
        mode, w = JOBS[job]
        if args.groups:
            w = dataclasses.replace(w, groups=args.groups)
        work[job] = w
        engine = make_engine(model_dir, mode, w, args)
        times = timed_runner(engine)
        prompts[job] = w.prompts(CPU_MODEL.vocab)
        warm[job] = dataclasses.replace(w, groups=2, seed=w.seed + 1).prompts(CPU_MODEL.vocab)
        generate(engine, warm[job], w.output, times)
        engines[job] = (engine, times)
    runs: dict[str, list[dict]] = {job: [] for job in args.jobs}
    for r in range(args.rounds):
        for job in args.jobs:
            engine, times = engines[job]
            res = generate(engine, prompts[job], work[job].output, times)
            runs[job].append(res)
            print(f"round {r} {job}: engine {res['engine_s']:.2f}s prefill steps {res['prefill_step_s']:.2f}s "
                  f"({res['prefill_tok_per_s']:.0f} tok/s) decode steps {res['decode_step_s']:.2f}s "
                  f"({res['decode_tok_per_s']:.0f} tok/s)", file=sys.stderr)
    outputs_agree = len({json.dumps(runs[j][0]["outputs"]) for j in args.jobs}) == 1
    profile_text = None
    if args.profile:
        engine, times = engines[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        generate(engine, prompts[args.profile], work[args.profile].output, times)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
        profile_text = buf.getvalue()
        print(profile_text, file=sys.stderr)
    result = {
        "bench": "engine_cpu_profile",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git": git_commit("engine", "kernels"),
        "model": dataclasses.asdict(CPU_MODEL),
        "jobs": {j: {"mode": JOBS[j][0], "workload": dataclasses.asdict(work[j]), **summarize(runs[j])}
                 for j in args.jobs},
        "rounds": args.rounds,
        "outputs_agree_across_jobs": outputs_agree,
        "note": "shared 2-core machine: other processes ran alongside; min is the least disturbed round",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=1))
    if not args.no_write:
        write_results(args.out or results_path("engine_cpu_profile", args.label), result)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
