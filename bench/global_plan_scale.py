"""Scale benchmark of `run --prefix-sharing plan` planning the whole table at once (planned_feed).

Every measurement is the real CLI, `python -m batchllm_cli run ...` of this checkout (PYTHONPATH and the
working directory are the repository root; the script checks which `batchllm_cli` is imported), in a
fresh process under `/usr/bin/time -v` for its peak RSS and wall time, with the built-in demo model
(engine/demo_model.py: random-weight Llama, 256 hidden x 4 layers, byte-level tokenizer, so one token per
byte), `--no-chat --max-tokens 1 --kv-cache-tokens 262144 --max-batch-tokens 2048`. Tables are generated
once (cached) as Parquet: D documents x Q questions, rows shuffled so each document's rows are spread
across the table, questions "item <k>?", template "Document: {{ doc }}\\nQuestion: {{ question }}\\nAnswer:"
(scale cases: without the "\\nAnswer:" tail, so a row's own tokens are only the end of its question).

Cases (each picks a table by its shape):
- acceptance: 1,000 docs x 70 questions = 70,000 shuffled rows, plan at the default --plan-chunk-tokens
  and at a small one (many cuts); `batchllm analyze --json` of the same table for the global unique
  tokens. Reports prefill/unique (goal <= 1.02), engine_wait_s/elapsed_s (goal < 1%), plan_chunks.
- equality: plan vs `--prefix-sharing none` on a smaller table of the same shape (none computes every
  prompt in full, too slow on 2 shared cores at 70k rows): the `response` columns must be equal.
- equality70k: the acceptance's equality at full size, made affordable on 2 cores by a smaller model
  (the demo model's recipe and tokenizer at 64 hidden x 2 layers, `tiny` below) and shorter documents:
  500 docs x 140 questions = 70,000 shuffled rows of ~124 tokens, `--max-tokens 3` (greedy, EOS
  ignored so every row decodes all 3), plan at a small --plan-chunk-tokens (each document's rows cut
  into several chunks) and at the default vs none (and lru with --with-lru), plus `analyze` of the same
  table: every output column must be equal row by row, and plan's prefill <= 1.02x analyze's unique tokens.
  `--equality70k-docs 15` runs the same case on the first 15 documents (2,100 rows) to time it first.
- scale: 100k and 1M rows of ~300 tokens (200 / 2,000 docs x 500 questions; ~1-2 unique tokens a row,
  so the engine part stays minutes on 2 cores): wall, peak RSS (goal < 4 GB at 1M), plan_s, engine_wait_s, elapsed_s,
  prefill vs unique, plan_out_of_core.

    python bench/global_plan_scale.py --out bench/results/global_plan_scale_cpu.json   # all cases
    python bench/global_plan_scale.py --cases acceptance equality scale100k --out FILE
    python bench/global_plan_scale.py --cases smoke        # 7,000 rows, ~2 minutes: checks the script
    python bench/global_plan_scale.py --cases equality70k --with-lru --out bench/results/global_plan_equality_cpu.json

Results are merged into --out case by case as they finish (a later invocation adds or replaces cases),
so a long case that is cut short leaves the others written.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_common import git_commit, write_results  # noqa: E402

TEMPLATE = "Document: {{ doc }}\nQuestion: {{ question }}\nAnswer:"
SCALE_TEMPLATE = "Document: {{ doc }}\nQuestion: {{ question }}"
ENGINE_ARGS = ["--no-chat", "--max-tokens", "1", "--kv-cache-tokens", "262144", "--max-batch-tokens", "2048"]
SUMMARY_FIELDS = (
    "rows", "rows_ok", "rows_failed", "prompt_tokens", "prefill_tokens", "unique_prompt_tokens",
    "plan_boundary_tokens", "plan_chunks", "plan_out_of_core", "plan_s", "engine_wait_s", "elapsed_s",
    "load_s", "write_s", "preemptions", "sharing_fallbacks", "peak_kv_blocks", "completion_tokens",
    "prefix_hit_tokens",
)
SEED = 11


@dataclass(frozen=True)
class Shape:
    docs: int
    questions: int
    doc_chars: int  # each document this many characters (one token each with the demo model)
    template: str

    @property
    def rows(self) -> int:
        return self.docs * self.questions

    @property
    def name(self) -> str:
        return f"d{self.docs}_q{self.questions}_c{self.doc_chars}"


# The questions are short ("item 17?") so the rows' unique tails stay small: the engine's work is the
# documents once plus ~10 tokens a row, which 2 shared cores finish in minutes.
# Acceptance: ~600 tokens a row: 70k rows ~ 41M prompt tokens (about 20 default chunks), ~1.3M unique.
ACCEPT = Shape(1000, 70, 560, TEMPLATE)
# Scale: ~300 tokens a row, nothing after the question, so ~1-2 unique tokens a row: 1M rows ~ 290M prompt
# tokens, ~1.7M unique (2,000 docs x 500 questions rather than 10,000 x 100: 5x fewer document tokens).
SCALE_100K = Shape(200, 500, 270, SCALE_TEMPLATE)
SCALE_1M = Shape(2000, 500, 270, SCALE_TEMPLATE)
# Equality at 70k rows: none computes every prompt in full (~8M tokens here), so the prompts are short and
# the model small; 140 questions a document, so a document's rows span several small plan chunks.
EQUAL_70K = Shape(500, 140, 80, TEMPLATE)
TINY_SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 172}
EQUAL_ENGINE_ARGS = ["--no-chat", "--max-tokens", "3", "--ignore-eos", "--kv-cache-tokens", "262144",
                     "--max-batch-tokens", "2048"]
EQUAL_CHUNK_TOKENS = 4096  # ~2,000 chunks of ~35 rows; a document's 140 rows (~16k tokens) span ~4


def _words(rng, n: int = 3000) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ro", "ta", "vu", "shi", "pra", "den", "gul", "or", "es", "an", "tic", "ber",
            "mon", "dal", "in", "ter", "ex", "pe", "ri", "ment", "con", "sta", "ble", "ous", "ly", "ing"]
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(syll[int(i)] for i in rng.integers(0, len(syll), int(rng.integers(1, 4))))] = None
    return list(out)


def _text(rng, words: list[str], chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < chars:
        w = words[int(rng.integers(0, len(words)))]
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:chars]


def build_table(cache: Path, shape: Shape, docs_limit: int | None = None) -> Path:
    """Parquet table of `shape` (or its first `docs_limit` documents), rows shuffled, generated once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = docs_limit or shape.docs
    path = cache / f"{shape.name}{'' if docs_limit is None else f'_first{docs}'}.parquet"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    words = _words(rng)
    doc_texts = [f"[{d}] " + _text(rng, words, shape.doc_chars) for d in range(shape.docs)][:docs]
    questions = [f"item {k}?" for k in range(shape.questions)]
    n = docs * shape.questions
    order = np.random.default_rng(SEED + 1).permutation(n)  # row r holds (doc, question) pair order[r]
    doc_of = order // shape.questions
    q_of = order % shape.questions
    table = pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64)),
        "doc_id": pa.array(doc_of.astype(np.int64)),
        "doc": pa.DictionaryArray.from_arrays(pa.array(doc_of.astype(np.int32)), pa.array(doc_texts)),
        "question": pa.DictionaryArray.from_arrays(pa.array(q_of.astype(np.int32)), pa.array(questions)),
    })
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=100_000)
    os.replace(tmp, path)
    return path


def template_file(cache: Path, shape: Shape) -> Path:
    path = cache / ("template.j2" if shape.template == TEMPLATE else "template_scale.j2")
    path.write_text(shape.template, encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def which_package() -> str:
    """The batchllm_cli a child process imports: must be this checkout's."""
    out = subprocess.run([sys.executable, "-c", "import batchllm_cli; print(batchllm_cli.__file__)"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().is_relative_to(ROOT), f"children import {out}, not this checkout {ROOT}"
    return out


def _child_pid(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rows_done(log: Path) -> int:
    """Rows finished so far, from the last progress line of the CLI's log (0 before the first)."""
    with log.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 300))
        found = re.findall(rb"run: (\d+)/\d+ rows", f.read())
    return int(found[-1]) if found else 0


def timed(args: list[str], log: Path, timeout_s: float) -> dict:
    """Run `python -m batchllm_cli ARGS` under /usr/bin/time -v: wall, peak RSS, exit code, and the RSS
    sampled every ~10 s with the rows done so far (to see whether the peak is in planning or in the engine,
    and when the engine's first rows came out). Past `timeout_s`
    the CLI gets SIGTERM (it commits its finished rows and exits), so /usr/bin/time still reports."""
    tfile = log.with_suffix(".time")
    tfile.unlink(missing_ok=True)
    cmd = ["/usr/bin/time", "-v", "-o", str(tfile), sys.executable, "-m", "batchllm_cli", *args]
    t = time.perf_counter()
    trace: list[tuple[float, float]] = []
    timed_out = False
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        last_sample = -1e9
        while proc.poll() is None:
            time.sleep(1.0)
            now = time.perf_counter() - t
            kid = _child_pid(proc.pid)
            if kid is not None and now - last_sample >= 10:
                rss = _rss_mb(kid)
                if rss is not None:
                    trace.append((round(now, 1), round(rss, 1), _rows_done(log)))
                    last_sample = now
            if now > timeout_s and not timed_out and kid is not None:
                timed_out = True
                os.kill(kid, signal.SIGTERM)
        rc = proc.returncode
    wall = time.perf_counter() - t
    info = tfile.read_text() if tfile.is_file() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", info)
    status = re.search(r"Exit status: (\d+)", info)
    signalled = re.search(r"Command terminated by signal (\d+)", info)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", info)]
    code = int(status.group(1)) if status else (-int(signalled.group(1)) if signalled else rc)
    return {"exit_code": code, "timed_out": timed_out, "wall_s": round(wall, 2),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "cpu_s": round(sum(cpu), 1) if cpu else None, "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "trace_s_rssmb_rows": trace,
            "log_tail": log.read_text()[-800:].replace("\r", "\n") if code != 0 else ""}


def run_job(table: Path, template: Path, model: Path, work: Path, label: str, mode: str,
            chunk_tokens: int | None, timeout_s: float, engine_args: list[str] = ENGINE_ARGS) -> dict:
    out = work / f"{label}.parquet"
    summary = work / f"{label}.summary.json"
    for p in (out, summary):
        p.unlink(missing_ok=True)
    args = ["run", str(table), "-t", str(template), "-o", str(out), "-m", str(model), "--prefix-sharing", mode,
            "--summary", str(summary), "--restart", *engine_args]
    if chunk_tokens is not None:
        args += ["--plan-chunk-tokens", str(chunk_tokens)]
    res = {"label": label, "mode": mode, "plan_chunk_tokens": chunk_tokens,
           "command": "python -m batchllm_cli " + " ".join(args)}
    res.update(timed(args, work / f"{label}.log", timeout_s))
    if summary.is_file():
        s = json.loads(summary.read_text())
        s = s | s.get("attempt", {})  # the run's counters sit under "attempt" in the summary
        res.update({k: s.get(k) for k in SUMMARY_FIELDS})
        res["engine_steps"] = s.get("engine", {}).get("steps")
        if s.get("elapsed_s"):
            res["engine_wait_share"] = round((s.get("engine_wait_s") or 0) / s["elapsed_s"], 5)
            res["rows_per_s"] = round(s["rows"] / s["elapsed_s"], 1)
            # elapsed_s: from the model loaded to the last row (writing excluded); less the time the engine
            # waited for its first chunk (planning that outlasted the load) and for later ones
            first_wait = max(0.0, (s.get("plan_s") or 0.0) - (s.get("load_s") or 0.0))
            res["engine_s"] = round(s["elapsed_s"] - first_wait - (s.get("engine_wait_s") or 0.0), 3)
    res["output"] = str(out)
    print(json.dumps({k: v for k, v in res.items() if k not in ("command", "log_tail")}), file=sys.stderr, flush=True)
    return res


def analyze(table: Path, template: Path, model: Path, work: Path, label: str, timeout_s: float) -> dict:
    report = work / f"{label}.analyze.json"
    report.unlink(missing_ok=True)
    args = ["analyze", str(table), "-t", str(template), "-m", str(model), "--no-chat", "--max-tokens", "1",
            "--json", str(report)]
    res = {"label": label, "command": "python -m batchllm_cli " + " ".join(args)}
    res.update(timed(args, work / f"{label}.analyze.log", timeout_s))
    if report.is_file():
        r = json.loads(report.read_text())
        res.update({k: r.get(k) for k in ("rows", "prompt_tokens", "unique_prompt_tokens", "plan_prefill_tokens")})
    print(json.dumps({k: v for k, v in res.items() if k not in ("command", "log_tail")}), file=sys.stderr, flush=True)
    return res


def responses_equal(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    ta = pq.read_table(a, columns=["id", "response"]).sort_by("id")
    tb = pq.read_table(b, columns=["id", "response"]).sort_by("id")
    ra, rb = ta.column("response").to_pylist(), tb.column("response").to_pylist()
    differ = sum(x != y for x, y in zip(ra, rb))
    return {"rows": len(ra), "rows_other": len(rb), "rows_differing": differ,
            "equal": len(ra) == len(rb) and differ == 0 and ta.column("id").equals(tb.column("id")),
            "distinct_responses": len(set(ra))}


def outputs_equal(a: Path, b: Path) -> dict:
    """Every column of two run outputs compared row by row (by id): mismatches per column, the first few rows."""
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a).sort_by("id"), pq.read_table(b).sort_by("id")
    same_ids = ta.column("id").equals(tb.column("id"))
    per_column: dict[str, int] = {}
    bad_rows: set[int] = set()
    if ta.column_names == tb.column_names and same_ids:
        ids = ta.column("id").to_pylist()
        for name in ta.column_names:
            ca, cb = ta.column(name).to_pylist(), tb.column(name).to_pylist()
            differ = [i for i, (x, y) in enumerate(zip(ca, cb)) if x != y]
            per_column[name] = len(differ)
            bad_rows.update(ids[i] for i in differ)
    equal = same_ids and ta.column_names == tb.column_names and not bad_rows
    return {"rows": ta.num_rows, "rows_other": tb.num_rows, "columns": ta.column_names,
            "columns_other": tb.column_names, "same_ids": same_ids, "mismatches_per_column": per_column,
            "rows_mismatching": len(bad_rows), "first_mismatching_ids": sorted(bad_rows)[:20], "equal": equal,
            "distinct_responses": len(set(ta.column("response").to_pylist()))}


def ensure_tiny_model(cache: Path) -> Path:
    """The demo model's weight recipe and byte-level tokenizer at TINY_SHAPE, built once."""
    from engine.demo_model import DemoShape, write_model_dir

    from bench.bench_common import cached_dir

    shape = DemoShape(**TINY_SHAPE)
    name = f"demo-recipe-{shape.layers}x{shape.hidden}-i{shape.intermediate}-h{shape.heads}-kv{shape.kv_heads}"
    return cached_dir(cache / name, lambda tmp: write_model_dir(tmp, shape))


def ratio(a: float | None, b: float | None, digits: int = 4) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def case_acceptance(ctx: dict, shape: Shape = ACCEPT, small_chunk: int = 500_000) -> dict:
    table = build_table(ctx["cache"], shape)
    an = analyze(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"accept_{shape.rows}", ctx["timeout"])
    runs = [run_job(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"accept_{shape.rows}_plan_default", "plan",
                    None, ctx["timeout"]),
            run_job(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"accept_{shape.rows}_plan_{small_chunk}",
                    "plan", small_chunk, ctx["timeout"])]
    for r in runs:
        r["prefill_over_analyze_unique"] = ratio(r.get("prefill_tokens"), an.get("unique_prompt_tokens"))
        r["meets_prefill_goal_1_02"] = (r["prefill_over_analyze_unique"] or 99) <= 1.02
        r["meets_wait_goal_1pct"] = (r.get("engine_wait_share") if r.get("engine_wait_share") is not None else 1) < 0.01
    same = responses_equal(Path(runs[0]["output"]), Path(runs[1]["output"]))
    return {"shape": shape.__dict__ | {"rows": shape.rows}, "table": str(table), "analyze": an, "runs": runs,
            "plan_default_vs_small_chunks_responses": same}


def case_equality(ctx: dict, docs: int) -> dict:
    shape = ACCEPT
    table = build_table(ctx["cache"], ACCEPT, docs_limit=docs)
    rows = docs * ACCEPT.questions
    plan = run_job(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"equal_{rows}_plan_small", "plan",
                   max(20_000, rows * 600 // 8), ctx["timeout"])
    none = run_job(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"equal_{rows}_none", "none", None,
                   ctx["timeout"])
    return {"shape": ACCEPT.__dict__ | {"docs": docs, "rows": rows}, "table": str(table),
            "note": "plan at a chunk size giving ~8 chunks vs none on the same table",
            "runs": [plan, none], "responses": responses_equal(Path(plan["output"]), Path(none["output"]))}


def case_equality70k(ctx: dict, docs: int | None, with_lru: bool) -> dict:
    """plan (many small chunks) vs none (and lru) on EQUAL_70K with the tiny model; analyze for the unique count."""
    shape = EQUAL_70K
    table = build_table(ctx["cache"], shape, docs_limit=docs)
    rows = (docs or shape.docs) * shape.questions
    template = template_file(ctx["cache"], shape)
    model = ensure_tiny_model(ctx["cache"] / "models")
    an = analyze(table, template, model, ctx["work"], f"eq70k_{rows}", ctx["timeout"])

    def job(mode: str, chunk: int | None, label: str) -> dict:
        return run_job(table, template, model, ctx["work"], f"eq70k_{rows}_{label}", mode, chunk, ctx["timeout"],
                       EQUAL_ENGINE_ARGS)

    plan = job("plan", EQUAL_CHUNK_TOKENS, "plan")
    plan_default = job("plan", None, "plan_default_chunks")
    for r in (plan, plan_default):
        r["prefill_over_analyze_unique"] = ratio(r.get("prefill_tokens"), an.get("unique_prompt_tokens"))
        r["meets_prefill_goal_1_02"] = (r["prefill_over_analyze_unique"] or 99) <= 1.02
    runs = [plan, plan_default, job("none", None, "none")]
    compared = {"plan_vs_none": outputs_equal(Path(plan["output"]), Path(runs[2]["output"])),
                "plan_default_chunks_vs_none": outputs_equal(Path(plan_default["output"]), Path(runs[2]["output"]))}
    if with_lru:
        runs.append(job("lru", None, "lru"))
        compared["plan_vs_lru"] = outputs_equal(Path(plan["output"]), Path(runs[3]["output"]))
    return {"shape": shape.__dict__ | {"docs": docs or shape.docs, "rows": rows}, "table": str(table),
            "model": f"demo recipe and tokenizer (engine/demo_model.py write_model_dir) at {TINY_SHAPE}, float32",
            "engine_args": EQUAL_ENGINE_ARGS, "analyze": an, "runs": runs, "compared": compared,
            "mismatching_rows": {k: v["rows_mismatching"] for k, v in compared.items()},
            "all_equal": all(v["equal"] for v in compared.values())}


def case_scale(ctx: dict, shape: Shape) -> dict:
    table = build_table(ctx["cache"], shape)
    r = run_job(table, template_file(ctx["cache"], shape), ctx["model"], ctx["work"], f"scale_{shape.rows}_plan", "plan", None,
                ctx["timeout"])
    r["prefill_over_unique"] = ratio(r.get("prefill_tokens"), r.get("unique_prompt_tokens"))
    trace = r["trace_s_rssmb_rows"]
    started = [(t, rows) for t, _, rows in trace if rows > 0]
    if started:  # from the trace, so a run stopped at the timeout still says where its time went
        r["first_rows_by_s"] = started[0][0]  # process start to first rows out: imports, load, plan, first chunk
        r["peak_rss_mb_before_first_rows"] = max(rss for t, rss, _ in trace if t <= started[0][0])
        (t0, n0), (t1, n1) = started[0], started[-1]
        r["engine_rows_per_s_sampled"] = round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None
        r["rows_done_at_end"] = n1
    r["meets_rss_goal_4gb"] = (r.get("peak_rss_mb") or 1e9) < 4096
    return {"shape": shape.__dict__ | {"rows": shape.rows}, "table": str(table), "runs": [r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["acceptance", "equality", "scale100k", "scale1m"],
                    choices=["smoke", "acceptance", "equality", "equality70k", "scale100k", "scale1m"])
    ap.add_argument("--equality-docs", type=int, default=40, help="documents (x70 rows) of the plan-vs-none table")
    ap.add_argument("--equality70k-docs", type=int, default=None,
                    help="equality70k on the first N documents (x140 rows) only, to time it first")
    ap.add_argument("--with-lru", action="store_true", help="equality70k: compare with --prefix-sharing lru too")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "batchllm-bench-globalplan")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds one CLI run may take before it is killed")
    ap.add_argument("--out", type=Path, default=None, help="merge each finished case into this JSON file")
    args = ap.parse_args()

    from engine.demo_model import ensure_demo_model

    started = dt.datetime.now(dt.timezone.utc)
    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"cache": args.cache, "work": work, "model": ensure_demo_model(args.cache / "models"),
           "timeout": args.timeout}
    package = which_package()
    doc = json.loads(args.out.read_text()) if args.out is not None and args.out.is_file() else {"cases": {}}
    for name in args.cases:
        t = time.perf_counter()
        if name == "smoke":
            result = case_acceptance(ctx, Shape(100, 70, 560, TEMPLATE), small_chunk=200_000)
        elif name == "acceptance":
            result = case_acceptance(ctx)
        elif name == "equality":
            result = case_equality(ctx, args.equality_docs)
        elif name == "equality70k":
            result = case_equality70k(ctx, args.equality70k_docs, args.with_lru)
        elif name == "scale100k":
            result = case_scale(ctx, SCALE_100K)
        else:
            result = case_scale(ctx, SCALE_1M)
        result["case_s"] = round(time.perf_counter() - t, 1)
        result["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        result["git"] = git_commit("batchllm_cli", "engine", "kernels")
        doc["cases"][name] = result
        doc.update({
            "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "date": started.isoformat(timespec="seconds"),
            "git": git_commit("batchllm_cli", "engine", "kernels"),
            "package_imported_by_children": os.path.relpath(package, ROOT),
            "model": "built-in demo model (engine/demo_model.py): random-weight Llama, 256 hidden x 4 layers, "
                     "byte-level tokenizer (1 token per byte), float32 on CPU; a case with its own 'model' used that",
            "engine_args": f"{ENGINE_ARGS}; a case with its own 'engine_args' used those",
            "templates": {"acceptance/equality": TEMPLATE, "scale": SCALE_TEMPLATE},
            "machine": {
                "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                "note": "2 CPU cores shared with other engineers' jobs: wall times are noisy (upper bounds); "
                        "peak RSS from /usr/bin/time -v of each CLI process",
            },
        })
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_results(args.out, doc)
        print(json.dumps({name: result}, indent=1, default=str))


if __name__ == "__main__":
    main()
