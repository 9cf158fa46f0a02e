"""The PyTorch attention paths on CPU: each reference (the definition) vs its fast CPU form, in one
process, interleaved rounds (min and median ms; the machine may be shared).

  shared-prefix decode: G groups x M members, P-token prefix, S-token suffix per member, 4 query / 2 KV
                        heads of 64, block 16 (`shared_prefix_decode_reference` vs `shared_prefix_decode_torch`)
  paged prefill:        N whole prompts of T tokens (`paged_attention_reference` vs `paged_attention_torch`
                        given the step's new keys)
  group prefill:        G groups x M members' prefill chunks of S tokens right after their P-token prefix
                        (`paged_attention_reference` vs `group_prefill_torch`, the prefix read once per group;
                        "previous": `paged_attention_torch`, the path such chunks took before, per chunk)

    python bench/cpu_attention.py [--rounds 7]
Writes bench/results/cpu_attention_<label>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import engine  # noqa: E402,F401  (first: the engine's OpenMP policy precedes torch's import)
import torch  # noqa: E402

from bench_common import cpu_run_header, results_path, write_results  # noqa: E402
from kernel_cases import make_decode_scenario, make_prefill_scenario  # noqa: E402  (tests/)
from kernels.group_prefill_torch import group_prefill_torch, plan_group_prefill_torch  # noqa: E402
from kernels.paged_attention import build_paged_batch, paged_attention_reference  # noqa: E402
from kernels.paged_attention_torch import paged_attention_torch, plan_paged_torch  # noqa: E402
from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference  # noqa: E402
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch  # noqa: E402

DECODE_CASES = [(10, 16, 1000, 30), (48, 16, 1200, 30), (4, 64, 2000, 100)]  # (G, M, P, S)
PREFILL_CASES = [(2, 1024), (8, 256)]  # (N, T)
GROUP_PREFILL_CASES = [(10, 16, 800, 40), (2, 8, 1152, 95)]  # (G, M, P, S): doc-QA and paper-shaped steps


def decode_case(g: int, m: int, p: int, s: int):
    sc = make_decode_scenario(0, [(p, [s] * m) for _ in range(g)], [], 4, 2, 64, 16)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, 16, "cpu")
    plan = plan_shared_prefix_torch(batch)
    return {"reference": lambda: shared_prefix_decode_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale),
            "fast": lambda: shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale)}


def prefill_case(n: int, t: int):
    sc = make_prefill_scenario(0, [(t, t)] * n, 4, 2, 64, 16)
    batch = build_paged_batch(sc.query_lens, sc.context_lens, sc.block_tables, 16, torch.device("cpu"))
    plan = plan_paged_torch(batch)
    bs, kvh, d = 16, 2, 64
    slots = torch.tensor([tb[p // bs] * bs + p % bs for tb in sc.block_tables for p in range(t)])
    key, value = sc.k_cache.view(-1, kvh, d)[slots], sc.v_cache.view(-1, kvh, d)[slots]
    return {"reference": lambda: paged_attention_reference(sc.q, sc.k_cache, sc.v_cache, batch, sc.scale),
            "fast": lambda: paged_attention_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale,
                                                  torch.empty_like(sc.q), key, value)}


def group_prefill_case(g: int, m: int, p: int, s: int):
    sc = make_decode_scenario(0, [(p, [s] * m) for _ in range(g)], [], 4, 2, 64, 16)
    n = len(sc.context_lens)
    qls = [s] * n
    starts = [i * s for i in range(n)]
    q = torch.randn(n * s, 4, 64, generator=torch.Generator().manual_seed(1))
    batch = build_paged_batch(qls, sc.context_lens, sc.block_tables, 16, torch.device("cpu"))
    paged = plan_paged_torch(batch)
    group = plan_group_prefill_torch(starts, qls, sc.context_lens, sc.block_tables, sc.group_ids, sc.prefix_lens, 16,
                                     "cpu", 2)
    return {"reference": lambda: paged_attention_reference(q, sc.k_cache, sc.v_cache, batch, sc.scale),
            "fast": lambda: group_prefill_torch(q, sc.k_cache, sc.v_cache, group, sc.scale, torch.empty_like(q)),
            "previous": lambda: paged_attention_torch(q, sc.k_cache, sc.v_cache, paged, sc.scale, torch.empty_like(q))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--label", default="cpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cases = {f"decode G{g} M{m} P{pp} S{s}": decode_case(g, m, pp, s) for g, m, pp, s in DECODE_CASES}
    cases |= {f"prefill N{n} T{t}": prefill_case(n, t) for n, t in PREFILL_CASES}
    cases |= {f"group prefill G{g} M{m} P{pp} S{s}": group_prefill_case(g, m, pp, s)
              for g, m, pp, s in GROUP_PREFILL_CASES}
    results = {}
    for name, fns in cases.items():
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
        results[name] = {k: {"min_ms": round(min(v), 2), "median_ms": round(statistics.median(v), 2)}
                         for k, v in times.items()}
        results[name]["speedup_median"] = round(results[name]["reference"]["median_ms"]
                                                / results[name]["fast"]["median_ms"], 2)
        if "previous" in fns:
            results[name]["speedup_vs_previous_median"] = round(results[name]["previous"]["median_ms"]
                                                                / results[name]["fast"]["median_ms"], 2)
        print(name, results[name], file=sys.stderr)
    out = {**cpu_run_header("cpu_attention", args.rounds), "results": results}
    if not args.no_write:
        write_results(results_path("cpu_attention", args.label), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
