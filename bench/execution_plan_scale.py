"""Time of the engine's per-wave prefix plan (`engine.planning.plan_execution`, as `LLMEngine.add_planned`
calls it: token lists packed, sorted, trie, plan) on paper-shaped
waves: `groups` x `degree` rows, each a shared random prefix + its own random suffix, shuffled.
The plan runs on the host before a wave starts, so on a GPU it is time the device waits.

    python bench/execution_plan_scale.py [--rows 6400 65536] [--out bench/results/execution_plan_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import git_commit  # noqa: E402  (bench/)
import numpy as np  # noqa: E402

from engine.planning import PackedSequences, plan_execution  # noqa: E402


def paper_rows(rows: int, degree: int, prefix: int, suffix: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out: list[list[int]] = []
    for g in range(rows // degree):
        shared = [g + 2] + [rng.randrange(2, 128000) for _ in range(prefix - 1)]
        out.extend(shared + [d + 2] + [rng.randrange(2, 128000) for _ in range(suffix - 1)] for d in range(degree))
    rng.shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[6400, 65536])
    p.add_argument("--degree", type=int, default=16)
    p.add_argument("--prefix", type=int, default=2000)
    p.add_argument("--suffix", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = []
    for n in args.rows:
        rows = paper_rows(n, args.degree, args.prefix, args.suffix, seed=0)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            plan = plan_execution(PackedSequences.from_lists(rows), np.full(n, 100))
            times.append(time.perf_counter() - t)
        results.append({"rows": n, "prompt_tokens": sum(map(len, rows)), "unique_prompt_tokens": plan.unique_prompt_tokens,
                        "shared_prefixes": plan.num_prefixes, "seconds_min": round(min(times), 3),
                        "seconds_all": [round(x, 3) for x in times]})
        print(f"rows {n:>6}: plan_execution {min(times):.3f} s (min of {args.repeat}), {plan.num_prefixes} shared prefixes")
    report = {"bench": "execution_plan_scale", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "git": git_commit("engine/planning"),
              "params": {"degree": args.degree, "prefix": args.prefix, "suffix": args.suffix}, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
