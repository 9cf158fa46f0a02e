"""Admission that learns answer lengths (`EngineConfig.learn_decode_lengths`, engine/scheduler.py)
vs reserving every row's decode growth up to --max-tokens, in one process, interleaved rounds.

Job: --rows distinct random-token prompts of 150-250 tokens, --max-tokens 256 (the CLI's default),
greedy, on the vs-vLLM benchmark's model (bench/vs_vllm.py: 4-layer 256-wide Llama, float32,
cached); half the vocabulary are stop tokens, so answers end after a few tokens, as a classification
or extraction job's do. The KV cache (--kv-tokens) is what binds: reserving 256 tokens per row holds
it to far fewer rows at once than the answers need. Reported per setting: engine seconds (min,
median), steps, preemptions, the typical answer length learned (95% of answers within it) and
the longest; and whether both settings gave the same tokens.

    PYTHONPATH=. python bench/decode_lengths.py [--rows 384] [--kv-tokens 8192] [--rounds 3]
Writes bench/results/decode_lengths_<label>.json.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/ (this script's directory), whose kernels.py is a bench

import engine  # noqa: E402,F401  (first: the engine's OpenMP policy precedes torch's import)

from bench_common import cpu_run_header, results_path, write_results  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {"reserve max tokens": False, "learn answer lengths": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--kv-tokens", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--label", default="cpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from vs_vllm import VOCAB, ensure_model, kv_bytes_per_token

    model = ensure_model(Path(os.environ.get("BATCHLLM_CACHE_DIR", Path.home() / ".cache" / "batchllm")))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(10, VOCAB) for _ in range(rng.randrange(150, 250))] for _ in range(args.rows)]
    params = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=tuple(range(0, VOCAB, 2)))
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    outputs: dict[str, dict] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in (list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))):
            cfg = EngineConfig(model_dir=str(model), device="cpu", dtype="float32", prefix_sharing="none",
                               kv_cache_memory=args.kv_tokens * kv_bytes_per_token(model),
                               kv_cache_tokens=args.kv_tokens, learn_decode_lengths=SETTINGS[name])
            eng = LLMEngine(cfg)
            start = time.perf_counter()
            outputs[name] = {x.key: list(x.token_ids) for x in eng.generate((i, q, params) for i, q in enumerate(prompts))}
            seconds = time.perf_counter() - start
            stats = eng.stats()
            if r:
                runs[name].append({"engine_s": round(seconds, 3), "steps": stats.steps, "preemptions": stats.preemptions,
                                   "typical_answer": eng.scheduler.typical_completion,
                                   "longest_answer": max(map(len, outputs[name].values()))})
                print(name, runs[name][-1], file=sys.stderr, flush=True)
    results = {
        name: {"engine_s_min": min(x["engine_s"] for x in v), "engine_s_median": statistics.median(x["engine_s"] for x in v),
               "steps": v[-1]["steps"], "preemptions": v[-1]["preemptions"], "typical_answer": v[-1]["typical_answer"],
               "longest_answer": v[-1]["longest_answer"]}
        for name, v in runs.items()
    }
    results["speedup_median"] = round(results["reserve max tokens"]["engine_s_median"]
                                      / results["learn answer lengths"]["engine_s_median"], 2)
    results["same_tokens"] = outputs["reserve max tokens"] == outputs["learn answer lengths"]
    print(results, file=sys.stderr)
    out = {**cpu_run_header("decode_lengths", args.rounds), "results": results, "runs": runs,
           "command": f"python bench/decode_lengths.py --rows {args.rows} --kv-tokens {args.kv_tokens} "
                      f"--max-tokens {args.max_tokens} --rounds {args.rounds}"}
    if not args.no_write:
        write_results(results_path("decode_lengths", args.label), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
