"""Scale benchmark of the prefix plan (engine side of `batchllm analyze`): prints JSON.

Synthesizes N prompts of ~300 tokens as packed int32 arrays with realistic sharing, rows in random
table order: "templates" (default) = a few system prompts x a few few-shot variants each, then a
unique row tail; "documents" = one instruction + one of N/20 documents + a unique question. Times
sort+LCP, trie, BatchLLM groups, execution plan + decode groups, LRU simulation (and optionally the
DuckDB out-of-core sort of batchllm_cli.table_io.token_sort); each size runs in its own process so
peak RSS is per size.

    python bench/prefix_plan_scale.py                      # 100k and 1M rows
    python bench/prefix_plan_scale.py --rows 100000 --duckdb
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine.planning.batchllm_baseline import batchllm_groups  # noqa: E402
from engine.planning.execution_plan import build_execution_plan, decode_groups  # noqa: E402
from engine.planning.lru_simulation import LruPrefixCache  # noqa: E402
from engine.planning.packed import PackedSequences  # noqa: E402
from engine.planning.prefix_plan import plan_from_sorted, plan_prefixes_from_sorted_stream  # noqa: E402
from engine.planning.sort import sort_sequences  # noqa: E402
from engine.planning.trie import TrieBuilder  # noqa: E402


def synthesize(
    n: int, seed: int = 0, vocab: int = 151_000, systems: int = 4, shots: int = 5
) -> PackedSequences:
    """systems x shots shared prefixes (system 80-160 tokens + few-shot block 60-140 tokens), then a
    unique tail of 30-110 tokens; built directly as flat arrays (no Python lists of tokens)."""
    rng = np.random.default_rng(seed)
    sys_p = [rng.integers(0, vocab, rng.integers(80, 161), dtype=np.int32) for _ in range(systems)]
    shot_p = [[rng.integers(0, vocab, rng.integers(60, 141), dtype=np.int32) for _ in range(shots)] for _ in range(systems)]
    prefixes = [np.concatenate([sys_p[a], shot_p[a][b]]) for a in range(systems) for b in range(shots)]
    pre_len = np.array([len(p) for p in prefixes], dtype=np.int64)
    which = rng.integers(0, len(prefixes), n)
    tail = rng.integers(30, 111, n).astype(np.int64)
    lengths = pre_len[which] + tail
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
    for k, p in enumerate(prefixes):
        rows = np.nonzero(which == k)[0]
        # Write the shared prefix at the start of each of these rows, one prefix position at a time.
        for j in range(len(p)):
            tokens[offsets[rows] + j] = p[j]
    return PackedSequences(tokens, offsets)


def synthesize_documents(
    n: int, seed: int = 0, vocab: int = 151_000, questions_per_doc: int = 20
) -> PackedSequences:
    """One instruction (60 tokens) + one of n/questions_per_doc documents (150-400 tokens) + a
    question (10-40 tokens), rows in random table order: the "document asked many questions" case,
    where an LRU cache smaller than the documents evicts a document between its questions."""
    rng = np.random.default_rng(seed)
    docs = max(1, n // questions_per_doc)
    instr = rng.integers(0, vocab, 60, dtype=np.int32)
    doc_len = rng.integers(150, 401, docs).astype(np.int64)
    doc_off = np.zeros(docs + 1, dtype=np.int64)
    np.cumsum(doc_len, out=doc_off[1:])
    doc_tokens = rng.integers(0, vocab, int(doc_off[-1]), dtype=np.int32)
    which = rng.permutation(np.arange(n) % docs)
    q_len = rng.integers(10, 41, n).astype(np.int64)
    lengths = len(instr) + doc_len[which] + q_len
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)  # questions stay random
    for j in range(len(instr)):
        tokens[offsets[:-1] + j] = instr[j]
    # Document tokens of every row: source index = doc start + position within the document.
    # In row chunks, so the index temporaries stay small and peak RSS measures the planner.
    for c in range(0, n, 1 << 15):
        w = which[c : c + (1 << 15)]
        dl = doc_len[w]
        within = np.arange(int(dl.sum()), dtype=np.int64) - np.repeat(np.cumsum(dl) - dl, dl)
        dst = np.repeat(offsets[c : c + len(w)] + len(instr), dl) + within
        tokens[dst] = doc_tokens[np.repeat(doc_off[w], dl) + within]
    return PackedSequences(tokens, offsets)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(n: int, block_size: int, kv_cache_tokens: int, duckdb: bool, scenario: str) -> dict:
    out: dict = {"scenario": scenario, "rows": n, "block_size": block_size, "kv_cache_tokens": kv_cache_tokens}
    t = time.perf_counter()
    seqs = synthesize(n) if scenario == "templates" else synthesize_documents(n)
    out["synth_s"] = round(time.perf_counter() - t, 3)
    out["tokens"] = seqs.total_tokens
    out["token_array_mb"] = round(seqs.tokens.nbytes / 2**20, 1)
    out["rss_after_synth_mb"] = round(peak_rss_mb(), 1)

    t0 = time.perf_counter()
    srt = sort_sequences(seqs)
    out["sort_lcp_s"] = round(time.perf_counter() - t0, 3)
    t = time.perf_counter()
    builder = TrieBuilder()
    builder.feed(seqs.lengths[srt.order], srt.lcp)
    trie = builder.finish()
    out["trie_s"] = round(time.perf_counter() - t, 3)
    out["trie_nodes"] = trie.num_nodes
    t = time.perf_counter()
    bl = batchllm_groups(trie, seqs.lengths[srt.order], block_size)
    out["batchllm_groups_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    decode_groups(build_execution_plan(trie, srt.order, seqs.lengths, 256), block_size)
    out["execution_plan_decode_groups_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    sim = LruPrefixCache(block_size, kv_cache_tokens)
    sim.feed(seqs)
    lru = sim.result()
    out["lru_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    plan = plan_from_sorted(
        seqs.lengths, srt, trie, keys=np.arange(n), block_size=block_size, max_tokens=256,
        lru=lru, kv_cache_tokens=kv_cache_tokens,
    )
    report = plan.report()
    out["assemble_report_s"] = round(time.perf_counter() - t, 3)
    out["total_s"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["prompt_tokens"] = report.prompt_tokens
    out["unique_prompt_tokens"] = report.unique_prompt_tokens
    out["sharing_ratio"] = round(report.sharing_ratio, 4)
    out["plan_prefill_tokens"] = report.plan_prefill_tokens
    out["batchllm_prefill_tokens"] = bl.prefill_tokens
    out["lru_prefill_tokens"] = lru.computed_tokens
    out["shared_groups"] = report.groups.shared_groups
    out["batchllm_shared_groups"] = report.batchllm_groups.shared_groups
    if duckdb:
        del plan, report, trie, srt
        t = time.perf_counter()
        step = 65536
        parts = (seqs.take(np.arange(i, min(i + step, n))) for i in range(0, n, step))
        from batchllm_cli.table_io.token_sort import sort_sequences_out_of_core

        ooc = plan_prefixes_from_sorted_stream(
            sort_sequences_out_of_core(parts), block_size=block_size, kv_cache_tokens=kv_cache_tokens
        )
        out["duckdb_out_of_core_total_s"] = round(time.perf_counter() - t, 3)
        out["duckdb_unique_prompt_tokens"] = ooc.unique_prompt_tokens
        out["peak_rss_after_duckdb_mb"] = round(peak_rss_mb(), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-tokens", type=int, default=262_144)
    ap.add_argument("--duckdb", action="store_true", help="also time the DuckDB out-of-core path")
    ap.add_argument("--scenario", choices=["templates", "documents"], default="templates")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.rows[0], args.block_size, args.kv_cache_tokens, args.duckdb, args.scenario)))
        return
    results = []
    for n in args.rows:
        cmd = [sys.executable, __file__, "--child", "--rows", str(n), "--block-size", str(args.block_size),
               "--kv-cache-tokens", str(args.kv_cache_tokens), "--scenario", args.scenario]
        cmd += ["--duckdb"] if args.duckdb else []
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
