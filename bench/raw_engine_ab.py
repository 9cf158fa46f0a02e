"""Engine speed A/B between code trees or environments, interleaved: raw (--prefix-sharing none) by default.

    PYTHONPATH=. python bench/raw_engine_ab.py --variant base=/tmp/base-tree --variant new=. \
        [--variant new-env=.:NAME=VALUE,NAME=VALUE] [--rows 96] [--job JOB --mode MODE] [--rounds 4] [--out FILE]

Each variant is LABEL=TREE[:ENV]: a checkout of this repository (imported with PYTHONPATH=TREE) and
optional environment variables. Every round runs each variant once in a fresh process (A B .., then
.. B A), so load on this shared machine hits all alike. A run uses the vs-vLLM benchmark's model
(bench/vs_vllm.py: 4-layer 256-wide Llama, float32 (`--dtype bfloat16`: computed in bfloat16), cached; `--hidden N --layers L`: a wider one of the
same recipe, whose activations are a real model's size) and times one warm-up `generate` and then
one timed `generate` of 32 greedy tokens per row (EOS ignored; `--no-warmup`: only the timed one, as a
one-shot `batchllm run` does), each in a fresh engine whose KV cache
is untouched (its page faults are part of the time, as in a real run). The prompts: by default
`--rows` distinct random-token prompts of ~490 tokens (the `nosharing` job's shape; token values do
not change the cost), a 128k-token KV cache and `--mode none`; with `--job NAME`, that vs-vLLM job's
prompts and KV size (e.g. `--job docqa-160 --mode plan`). Default step budget. Reported per variant:
engine seconds (min, median), the process's CPU seconds and minor page faults during the timed call,
the seconds in prefill-carrying vs decode-only steps, and whether all variants produced the same tokens.

Beware environment variants that set one of glibc's MALLOC_*_ variables: any of them also turns off
malloc's dynamic mmap threshold (every activation above 128 KiB then gets a fresh mmap), so such a
variant is not "the default allocator" (raw_engine_ab_cpu.json's first run had one: 1.8M page faults).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CHILD = r"""
import json, os, resource, sys, time
import engine  # first: the engine's OpenMP policy precedes torch's import
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
model, prompts_file, mode, kv_tokens, kv_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
warm_up = sys.argv[6] == "1"
dtype = sys.argv[7]
with open(prompts_file) as f:
    prompts = json.load(f)
rows = len(prompts)
params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
cfg = EngineConfig(model_dir=model, device="cpu", dtype=dtype, prefix_sharing=mode,
                   kv_cache_memory=kv_bytes, kv_cache_tokens=kv_tokens)
def run():
    eng = LLMEngine(cfg)
    steps = {"prefill_s": 0.0, "decode_s": 0.0}
    inner = eng.runner.run
    def timed(chunks, *a, **k):
        t = time.perf_counter()
        out = inner(chunks, *a, **k)
        steps["decode_s" if all(c.num_tokens == 1 for c in chunks) else "prefill_s"] += time.perf_counter() - t
        return out
    eng.runner.run = timed
    faults, cpu, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
    done = {r.key: list(r.token_ids) for r in eng.generate((i, p, params) for i, p in enumerate(prompts))}
    return {"engine_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, **steps,
            "tokens_hash": hash(tuple(tuple(done[i]) for i in range(rows))), "engine_file": engine.__file__}
if warm_up:
    run()
print(json.dumps(run()))
"""


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    label, _, rest = text.partition("=")
    tree, _, env = rest.partition(":")
    pairs = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    return label, Path(tree).resolve(), pairs


def job_prompts(model: Path, job: str | None, rows: int) -> tuple[list[list[int]], int]:
    """The runs' prompt token ids and KV cache tokens: `rows` random-token prompts of ~490 tokens and a
    128k-token cache, or the vs-vLLM job's (tokenized once, here)."""
    if job is None:
        rng = random.Random(3)
        return [[0] + [rng.randrange(2, 8192) for _ in range(rng.randrange(470, 510))] for _ in range(rows)], 131072
    from engine.tokenizer import Tokenizer
    from vs_vllm import JOBS, job_token_ids

    spec = JOBS[job]
    return job_token_ids(spec, Tokenizer(model)), spec.kv_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="LABEL=TREE[:NAME=VALUE,...]")
    p.add_argument("--rows", type=int, default=96, help="random-token prompts (without --job)")
    p.add_argument("--job", default=None, help="a bench/vs_vllm.py job's prompts and KV size instead (e.g. docqa-160)")
    p.add_argument("--mode", choices=("plan", "lru", "none"), default="none", help="--prefix-sharing of every run")
    p.add_argument("--hidden", type=int, default=None,
                   help="a wider random model of the same recipe (its activations a real model's size)")
    p.add_argument("--layers", type=int, default=None, help="with --hidden: its layers")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the process's first generate (a one-shot CLI job: first steps of each size included)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of every run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from bench_common import git_commit, write_results
    from vs_vllm import HIDDEN, LAYERS, ensure_model, kv_bytes_per_token

    cache = Path(os.environ.get("BATCHLLM_CACHE_DIR", Path.home() / ".cache" / "batchllm"))
    shape = {"hidden": args.hidden or HIDDEN, "layers": args.layers or LAYERS}
    model = ensure_model(cache, shape["hidden"], shape["layers"])
    prompts, kv_tokens = job_prompts(model, args.job, args.rows)
    prompts_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with prompts_file:
        json.dump(prompts, prompts_file)
    child_args = [str(model), prompts_file.name, args.mode, str(kv_tokens),
                  str(kv_tokens * kv_bytes_per_token(model, args.dtype)), "0" if args.no_warmup else "1", args.dtype]
    variants = [parse_variant(v) for v in args.variant]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    loads = []
    for r in range(args.rounds):
        for label, tree, env in variants if r % 2 == 0 else variants[::-1]:
            # run in the tree: `python -c` puts its working directory first on sys.path, ahead of PYTHONPATH,
            # so started from another checkout it would import that checkout's engine (before this, runs
            # started from the repository compared the repository with itself)
            proc = subprocess.run([sys.executable, "-c", CHILD, *child_args], capture_output=True, cwd=tree,
                                  text=True, env={**os.environ, "PYTHONPATH": str(tree), **env}, check=True)
            runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            imported = Path(runs[label][-1].pop("engine_file")).resolve()
            assert imported.is_relative_to(tree), f"{label} imported {imported}, not {tree}'s engine"
            loads.append(os.getloadavg()[0])
            print(f"round {r} {label}: {runs[label][-1]['engine_s']:.2f}s (load {loads[-1]:.1f})", flush=True)
    os.unlink(prompts_file.name)
    base = variants[0][0]
    summary = {}
    for label, tree, env in variants:
        rs = runs[label]
        med = {k: statistics.median(x[k] for x in rs) for k in ("engine_s", "cpu_s", "minor_faults", "prefill_s", "decode_s")}
        summary[label] = {
            "tree": str(tree), "env": env, "engine_s": [round(x["engine_s"], 3) for x in rs],
            "engine_s_min": round(min(x["engine_s"] for x in rs), 3), "engine_s_median": round(med["engine_s"], 3),
            "cpu_s_median": round(med["cpu_s"], 3), "minor_faults_median": int(med["minor_faults"]),
            "prefill_steps_s_median": round(med["prefill_s"], 3), "decode_steps_s_median": round(med["decode_s"], 3),
            "same_tokens_as_first": all(x["tokens_hash"] == runs[base][0]["tokens_hash"] for x in rs),
        }
        summary[label]["speedup_median_vs_first"] = round(summary[base]["engine_s_median"] / med["engine_s"], 3)
        summary[label]["speedup_min_vs_first"] = round(summary[base]["engine_s_min"] / summary[label]["engine_s_min"], 3)
        print(label, json.dumps(summary[label]))
    if args.out:
        write_results(args.out, {
            "benchmark": "raw_engine_ab", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/raw_engine_ab.py", *(argv if argv is not None else sys.argv[1:])]),
            "git": git_commit("engine", "kernels"), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "note": "Shared 2-core machine: loadavg_1m per run recorded; interleaved rounds; compare medians.",
            "job": args.job or "random", "mode": args.mode, "rows": len(prompts), "kv_tokens": kv_tokens,
            "model": shape, "dtype": args.dtype,
            "rounds": args.rounds, "loadavg_1m": loads, "variants": summary,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
