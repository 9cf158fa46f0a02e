"""CPU decode attention (`kernels.paged_attention_torch`): all decode rows as one padded batch vs in
chunks of rows of similar length (the default, `DECODE_CHUNK_BYTES`), in one process, interleaved
rounds (min and median ms; the machine may be shared).

Rows: 192 decode rows, 4 query / 2 KV heads of 64, float32, block 16, each row's blocks scattered
over a 20,000-block cache (as after a while of paging). Length mixes:
  uniform    470-540 tokens (the vs-vLLM `nosharing` job's shape)
  mixed      50-2,000 tokens
  one long   one row of 4,000 tokens among 191 rows of 300
Settings: "one padded batch" (a chunk budget larger than the step: every row padded to the longest,
what the path did before), and chunk budgets of 4, 16 (default) and 64 MB. Each timed call builds a
fresh plan from the same metadata and runs the attention once, as the first layer of a step does;
the outputs of all settings must agree (max_abs_diff: float32 rounding only).

The same for the suffix part of shared-prefix decode (`kernels.shared_prefix_torch`: each row's own
keys after its group's prefix): 8 groups x 24 rows, a 1,000-token prefix each, suffixes of 10-2,000
tokens (a shared instruction, then each row's own document).

And the attention call itself on one gathered batch (192 rows x 512 keys, a padding mask): SDPA's own
GQA (`enable_gqa=True`, what decode rows used before) vs `kernels.paged_attention.attend`, which folds
each KV head's query heads into rows of one query (the fused CPU kernel then reads each key once).

    python bench/decode_chunks.py [--rounds 6]
Writes bench/results/decode_chunks_<label>.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import engine  # noqa: E402,F401  (first: the engine's OpenMP policy precedes torch's import)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))

import kernels.paged_attention_torch as paged_torch  # noqa: E402
from kernel_cases import make_decode_scenario  # noqa: E402  (tests/)
from kernels.shared_prefix_attention import build_shared_prefix_batch  # noqa: E402
from kernels.shared_prefix_torch import plan_shared_prefix_torch, shared_prefix_decode_torch  # noqa: E402
from bench_common import cpu_run_header, results_path, write_results  # noqa: E402
from kernels.paged_attention import attend, build_paged_batch  # noqa: E402

NUM_BLOCKS, BLOCK, KV_HEADS, HEADS, HEAD_DIM, ROWS = 20000, 16, 2, 4, 64, 192
SETTINGS = {"one padded batch": 1 << 60, "chunks 4 MB": 4 << 20, "chunks 16 MB (default)": 16 << 20,
            "chunks 64 MB": 64 << 20}


def length_mixes(rng: random.Random) -> dict[str, list[int]]:
    return {
        "uniform 470-540": [rng.randrange(470, 540) for _ in range(ROWS)],
        "mixed 50-2000": [rng.randrange(50, 2000) for _ in range(ROWS)],
        "one long 4000 + 191 x 300": [4000] + [300] * (ROWS - 1),
    }


def interleaved(variants: dict[str, Callable[[], torch.Tensor]], rounds: int) -> tuple[dict, dict]:
    """({variant: {min_ms, median_ms}}, {variant: its last output}), variants run in alternating order
    each round (round 0 warms up)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs: dict[str, torch.Tensor] = {}
    for r in range(rounds + 1):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            start = time.perf_counter()
            outs[name] = variants[name]()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min_ms": round(min(v), 2), "median_ms": round(statistics.median(v), 2)} for name, v in times.items()}, outs


def timed_settings(run, rounds: int) -> dict:
    """min / median ms of run(setting) per setting, interleaved; how far the outputs differ."""
    def with_budget(budget: int) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            paged_torch.DECODE_CHUNK_BYTES = budget
            return run()
        return go

    result, outs = interleaved({s: with_budget(b) for s, b in SETTINGS.items()}, rounds)
    base = outs["one padded batch"]
    # padding changes the fused kernel's tiling, so float32 rounding may differ in the last bits
    result["max_abs_diff"] = max(float((o - base).abs().max()) for o in outs.values())
    result["speedup_median_default"] = round(
        result["one padded batch"]["median_ms"] / result["chunks 16 MB (default)"]["median_ms"], 2)
    return result


def shared_prefix_case(rng: random.Random, rounds: int) -> dict:
    groups = [(1000, [rng.randrange(10, 2000) for _ in range(24)]) for _ in range(8)]
    sc = make_decode_scenario(0, groups, [], HEADS, KV_HEADS, HEAD_DIM, BLOCK, extra_q_rows=0)
    batch = build_shared_prefix_batch(sc.query_rows, sc.context_lens, sc.block_tables, sc.group_ids,
                                      sc.prefix_lens, BLOCK, "cpu")
    buffers = paged_torch.GatherBuffers()

    def run() -> torch.Tensor:
        plan = plan_shared_prefix_torch(batch, None, HEADS // KV_HEADS, buffers=buffers)
        return shared_prefix_decode_torch(sc.q, sc.k_cache, sc.v_cache, plan, sc.scale, out=torch.empty_like(sc.q))

    result = timed_settings(run, rounds)
    print("shared prefix", result, file=sys.stderr)
    return result


def gqa_case(rounds: int) -> dict:
    n, keys = ROWS, 512
    k = torch.randn(n, KV_HEADS, keys, HEAD_DIM)
    v = torch.randn(n, KV_HEADS, keys, HEAD_DIM)
    q = torch.randn(n, HEADS, 1, HEAD_DIM)
    mask = (torch.arange(keys)[None, :] < torch.randint(470, keys + 1, (n,))[:, None]).view(n, 1, 1, keys)
    variants = {
        "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "heads folded (attend)": lambda: attend(q, k, v, mask, HEAD_DIM**-0.5),
    }
    result, outs = interleaved(variants, rounds)
    result["max_abs_diff"] = float((outs["sdpa enable_gqa"] - outs["heads folded (attend)"]).abs().max())
    result["speedup_median"] = round(result["sdpa enable_gqa"]["median_ms"] / result["heads folded (attend)"]["median_ms"], 2)
    print("gqa", result, file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--label", default="cpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    results = {"decode attention call, 192 rows x 512 keys, 4 heads / 2 KV heads": gqa_case(args.rounds),
               "shared prefix, suffixes 10-2000": shared_prefix_case(rng, args.rounds)}
    for name, lens in length_mixes(rng).items():
        order = list(range(NUM_BLOCKS))
        rng.shuffle(order)
        tables, used = [], 0
        for n in lens:
            blocks = -(-n // BLOCK)
            tables.append(order[used : used + blocks])
            used += blocks
        batch = build_paged_batch([1] * ROWS, lens, tables, BLOCK, torch.device("cpu"))
        q = torch.randn(ROWS, HEADS, HEAD_DIM)
        buffers = paged_torch.GatherBuffers()  # an engine's, kept across steps

        def run() -> torch.Tensor:
            plan = paged_torch.plan_paged_torch(batch, buffers)
            return paged_torch.paged_attention_torch(q, k_cache, v_cache, plan, HEAD_DIM**-0.5, torch.empty_like(q))

        results[name] = timed_settings(run, args.rounds)
        print(name, results[name], file=sys.stderr)
    out = {**cpu_run_header("decode_chunks", args.rounds), "results": results,
           "command": f"python bench/decode_chunks.py --rounds {args.rounds}"}
    if not args.no_write:
        write_results(results_path("decode_chunks", args.label), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
