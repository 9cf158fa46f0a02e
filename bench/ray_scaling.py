"""Scale-out benchmark of `run --workers N` (batchllm_cli/ray_run.py).

Cases:
- cpu: the real CLI (`python -m batchllm_cli run ...` of this checkout, a fresh process each, local Ray
  started by the run) on a shuffled doc-QA table (DOCS documents x QUESTIONS questions, demo model), at
  one CPU thread per engine (BATCHLLM_NUM_THREADS=1): no Ray (one process), --workers 1, --workers 2,
  interleaved REPS times. Reports wall time, the summary's generation time (elapsed_s: models loaded to
  last result), rows/s over it, load_s (Ray, workers and models starting), per-worker engine time, and
  the partition's balance. The outputs must be equal.
- partition: the paper-style estimate of N-replica scaling from a real plan: the 70,000-row shuffled
  doc-QA table of bench/global_plan_scale.py (1,000 documents x 70 questions, ~600 tokens a row) and a
  skewed variant of the same size (document lengths and questions per document drawn log-normally), are
  rendered, tokenized and sorted exactly as `run` plans them (planned_feed.tokenize_rows, sort_spool);
  the sorted plan is partitioned over N = 2, 4, 8 replicas (engine.partition_sorted) with MAX_TOKENS
  decode tokens a row. Estimated speedup = the work of one replica (the job's unique prefill + decode)
  over the largest part's work (parts run in parallel; the slowest ends the job). The same estimate for a
  prefix-blind split (rows dealt out in table order, as a replica-per-shard batch runner does) shows
  what the prefix-group partition saves: each replica then computes every document it touches.

    python bench/ray_scaling.py --out bench/results/ray_scaling_cpu.json            # both cases
    python bench/ray_scaling.py --cases partition --out bench/results/ray_scaling_cpu.json
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_common import git_commit, write_results  # noqa: E402

DOCS, QUESTIONS, DOC_WORDS = 40, 12, 60
# A KV cache of 2,048 tokens holds ~30 rows at once, so the job runs in waves and splitting it halves
# each engine's steps (with every row in one wave, steps are the same for any split of the rows).
CPU_ARGS = ["--no-chat", "--max-tokens", "24", "--kv-cache-tokens", "2048", "--max-batch-tokens", "1024"]
REPS = 2
PARTS = (2, 4, 8)
MAX_TOKENS = 64


def _cpu_table(path: Path) -> Path:
    rows = [(d, f"document {d}: " + " ".join(f"w{(d * 31 + j) % 997}" for j in range(DOC_WORDS)), f"question {q}?")
            for d in range(DOCS) for q in range(QUESTIONS)]
    perm = [(i * 101) % len(rows) for i in range(len(rows))]  # 101 is prime to 480: a shuffle
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["doc_id", "doc", "q"])
        w.writerows(rows[i] for i in perm)
    return path


def _run_cli(tmp: Path, name: str, inp: Path, tpl: Path, extra: list[str]) -> dict:
    out, summary = tmp / f"{name}.parquet", tmp / f"{name}.json"
    env = {**os.environ, "BATCHLLM_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batchllm_cli", "run", str(inp), "-t", str(tpl), "-o", str(out),
                           *CPU_ARGS, "--summary", str(summary), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(summary.read_text())
    att = s["attempt"]
    import pyarrow.parquet as pq

    answers = pq.read_table(out, columns=["response"]).column(0).to_pylist()
    for p in (out, summary, out.with_name(out.name + ".success.json")):
        p.unlink(missing_ok=True)
    scale = s.get("scale_out") or {}
    return {
        "wall_s": round(wall, 2), "elapsed_s": att["elapsed_s"], "rows_per_s": att["rows_per_s"],
        "load_s": att["load_s"], "prefill_tokens": att["prefill_tokens"], "completion_tokens": att["completion_tokens"],
        "workers": s["workers"], "worker_engine_s": [w["engine_s"] for w in scale.get("per_worker", [])],
        "worker_rows": [w["rows"] for w in scale.get("per_worker", [])],
        "partition_balance": (scale.get("partition") or {}).get("balance"), "answers": answers,
    }


def case_cpu() -> dict:
    variants = {"no_ray": [], "workers_1": ["--workers", "1"], "workers_2": ["--workers", "2"]}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as d:
        tmp = Path(d)
        inp = _cpu_table(tmp / "docs.csv")
        tpl = tmp / "t.j2"
        tpl.write_text("Read: {{ doc }}\nAnswer: {{ q }}", encoding="utf-8")
        for rep in range(REPS):
            for name, extra in variants.items():  # interleaved: A B C A B C
                r = _run_cli(tmp, f"{name}_{rep}", inp, tpl, extra)
                print(f"{name} rep {rep}: {({k: v for k, v in r.items() if k != 'answers'})}", file=sys.stderr)
                runs[name].append(r)
    reference = runs["no_ray"][0]["answers"]
    same = all(r["answers"] == reference for rs in runs.values() for r in rs)
    table = {}
    for name, rs in runs.items():
        table[name] = {
            "elapsed_s_min": min(r["elapsed_s"] for r in rs), "elapsed_s_median": statistics.median(r["elapsed_s"] for r in rs),
            "rows_per_s_max": max(r["rows_per_s"] for r in rs),
            "wall_s_min": min(r["wall_s"] for r in rs), "load_s_median": statistics.median(r["load_s"] for r in rs),
            "runs": [{k: v for k, v in r.items() if k != "answers"} for r in rs],
        }
    base = table["workers_1"]["elapsed_s_min"]
    return {
        "table": f"{DOCS} docs x {QUESTIONS} questions = {DOCS * QUESTIONS} rows, shuffled; {' '.join(CPU_ARGS)}",
        "threads_per_engine": 1, "reps": REPS, "outputs_equal": same, "results": table,
        "speedup_2_vs_1_workers_elapsed_min": round(base / table["workers_2"]["elapsed_s_min"], 3),
        "elapsed_min_1_worker_over_no_ray": round(base / table["no_ray"]["elapsed_s_min"], 3),
    }


def _skewed_table(path: Path, rows: int) -> Path:
    """`rows` doc-QA rows, shuffled, with log-normal document lengths and questions per document."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    counts: list[int] = []
    while sum(counts) < rows:
        counts.append(int(min(max(rng.lognormal(3.5, 1.0), 1), 2000)))
    counts[-1] -= sum(counts) - rows
    lengths = np.clip(rng.lognormal(6.2, 0.8, len(counts)), 50, 8000).astype(int)
    docs = [f"[{d}] " + ("lorem ipsum dolor sit amet " * (int(n) // 27 + 1))[: int(n)] for d, n in enumerate(lengths)]
    doc_of = np.repeat(np.arange(len(counts)), counts)
    q_of = np.concatenate([np.arange(c) for c in counts])
    perm = rng.permutation(rows)
    pq.write_table(pa.table({"doc": [docs[i] for i in doc_of[perm]], "question": [f"item {q}?" for q in q_of[perm]]}), path)
    return path


def _real_plan(inp: Path, tpl: Path, tmp: Path):  # noqa: ANN202 - (lengths, lcp, order, spool row ids)
    """The job's plan exactly as `run` makes it: (prompt lengths in sorted order, neighbour LCPs,
    sorted -> table row order)."""
    from batchllm_cli.run_prepare import prepare_run
    from batchllm_cli.job_types import RunSettings
    from batchllm_cli.planned_feed import tokenize_rows
    from batchllm_cli.token_spool import TokenSpool, default_memory_budget, sort_spool

    settings = RunSettings(input=inp, template=str(tpl), output=tmp / "out.parquet", chat=False, max_tokens=MAX_TOKENS)
    prepared = prepare_run(settings)
    try:
        spool_dir = tmp / "spool"
        spool_dir.mkdir()
        spool = TokenSpool(spool_dir)
        tokenize_rows(prepared, prepared.committed.done, spool, lambda rows: None)
        order, lcp, _ = sort_spool(spool, default_memory_budget(), spool_dir)
        return spool.lengths[order], lcp, spool.row_ids[order]
    finally:
        prepared.close()


def _blind_split_work(lengths, lcp, row_of, parts: int) -> list[int]:  # noqa: ANN001
    """Each part's work when rows are dealt out in table order (row r to part r * parts // n)."""
    import numpy as np

    n = len(lengths)
    part_of_sorted = (row_of * parts) // n
    work = []
    for p in range(parts):
        pos = np.flatnonzero(part_of_sorted == p)
        # a part's rows in sorted order share with the one before the minimum LCP over the rows between
        shared = sum(int(lcp[a + 1 : b + 1].min()) for a, b in zip(pos[:-1].tolist(), pos[1:].tolist()))
        work.append(int(lengths[pos].sum()) - shared + len(pos) * MAX_TOKENS)
    return work


def case_partition() -> dict:
    import numpy as np

    from bench.global_plan_scale import ACCEPT, build_table, template_file
    from engine import partition_sorted, unique_prompt_tokens

    out = {}
    with tempfile.TemporaryDirectory(prefix="ray-partition-") as d:
        tmp = Path(d)
        cache = Path(os.environ.get("TMPDIR", "/tmp")) / "batchllm-bench-globalplan"  # global_plan_scale's
        tables = {
            "doc_qa_70k_uniform": (build_table(cache, ACCEPT), template_file(cache, ACCEPT)),
            "doc_qa_70k_skewed": (_skewed_table(tmp / "skewed.parquet", ACCEPT.rows), template_file(cache, ACCEPT)),
        }
        for name, (inp, tpl) in tables.items():
            t = time.perf_counter()
            case_dir = tmp / name
            case_dir.mkdir()
            lengths, lcp, row_of = _real_plan(inp, tpl, case_dir)
            plan_s = time.perf_counter() - t
            n = len(lengths)
            single = unique_prompt_tokens(lengths, lcp) + n * MAX_TOKENS
            entry = {"rows": n, "prompt_tokens": int(lengths.sum()), "unique_prompt_tokens": unique_prompt_tokens(lengths, lcp),
                     "one_replica_work": single, "plan_s": round(plan_s, 1), "parts": {}}
            for parts in PARTS:
                p = partition_sorted(lengths, lcp, MAX_TOKENS, parts)
                blind = _blind_split_work(lengths, lcp, row_of, parts)
                entry["parts"][str(parts)] = {
                    "top_groups": p.top_groups, "split_groups": p.split_groups, "balance_max_over_mean": round(p.balance, 4),
                    "est_speedup": round(single / int(p.work.max()), 3),
                    "est_efficiency": round(single / int(p.work.max()) / parts, 3),
                    "prefix_blind_split": {"balance_max_over_mean": round(max(blind) / float(np.mean(blind)), 4),
                                           "est_speedup": round(single / max(blind), 3),
                                           "extra_work_vs_one_replica": round(sum(blind) / single - 1, 3)},
                }
                print(f"{name} N={parts}: {entry['parts'][str(parts)]}", file=sys.stderr)
            out[name] = entry
    return {"max_tokens": MAX_TOKENS, "tables": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["cpu", "partition"], choices=["cpu", "partition"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_scaling_cpu.json")
    args = ap.parse_args()
    import batchllm_cli

    assert Path(batchllm_cli.__file__).resolve().is_relative_to(ROOT), batchllm_cli.__file__
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"cases": {}}
    for case in args.cases:
        t = time.perf_counter()
        load_start = round(os.getloadavg()[0], 2)
        data = case_cpu() if case == "cpu" else case_partition()
        result["cases"][case] = {**data, "seconds": round(time.perf_counter() - t, 1),
                                 "loadavg_1m_at_start": load_start, "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
        result.update({
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git": git_commit("batchllm_cli", "engine"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        })
        write_results(args.out, result)


if __name__ == "__main__":
    main()
