"""Scale benchmark of `batchllm analyze` against tokenization alone: prints and writes JSON.

For each size (default 100k and 1M rows) it generates (once, cached) a Parquet table with a few
system prompts x few-shot variants and a unique review per row, ~300 tokens rendered, and a byte-level
BPE tokenizer trained offline (8k vocabulary, no downloads). Then, each in a fresh subprocess so peak
RSS is per measurement:

- tokenize: read the table, render every row and batch-encode it with the fast tokenizer into packed
  arrays (`PromptEncoder.encode_packed`, the front end analyze uses), nothing else: the floor any
  analysis has to pay;
- analyze: the real command, `batchllm analyze TABLE --template T --tokenizer DIR --json FILE`
  (in memory, the default choice on this machine); at the smallest size also `--out-of-core`;
- tokenize_lists (smallest size only): the same rows through `PromptEncoder.encode`, the list-of-ints
  path `run` feeds the engine with, for comparison.

    python bench/analyze_scale.py --repeat 3 --out bench/results/analyze_scale_cpu.json   # 100k (x3), 1M
    python bench/analyze_scale.py --rows 100000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = """{{ system }}

{{ examples }}

Review {{ id }}: {{ text }}
Label:"""
SYSTEMS = 4
SHOTS = 5
VOCAB = 8000
SEED = 7


def _words(rng, n: int = 6000) -> list[str]:
    """English-looking pseudo-words (syllable chains), deterministic."""
    syll = ["ka", "lo", "mi", "ne", "ro", "ta", "vu", "shi", "pra", "den", "gul", "or", "es", "an", "tic", "ber",
            "mon", "dal", "in", "ter", "ex", "pe", "ri", "ment", "con", "sta", "ble", "ous", "ly", "ing"]
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(rng.integers(1, 4))
        out["".join(syll[int(i)] for i in rng.integers(0, len(syll), k))] = None
    return list(out)


def _sentence(rng, words: list[str], n: int) -> str:
    idx = rng.integers(0, len(words), n)
    text = " ".join(words[int(i)] for i in idx)
    return text[0].upper() + text[1:] + "."


def build_inputs(cache: Path, rows: int) -> tuple[Path, Path, Path]:
    """(table.parquet, template.j2, tokenizer dir) for `rows` rows, generated once into `cache`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache.mkdir(parents=True, exist_ok=True)
    template = cache / "template.j2"
    template.write_text(TEMPLATE, encoding="utf-8")
    rng = np.random.default_rng(SEED)
    words = _words(rng)
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        corpus = [_sentence(rng, words, 60) for _ in range(4000)]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        tok_dir.mkdir(exist_ok=True)
        tok.save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 1 << 20}
        ))
    table = cache / f"rows_{rows}.parquet"
    if table.is_file():
        return table, template, tok_dir
    rng = np.random.default_rng(SEED + 1)
    systems = [
        f"You are assistant number {a}. " + " ".join(_sentence(rng, words, 14) for _ in range(5)) for a in range(SYSTEMS)
    ]
    shots = [
        [f"Example set {a}.{b}:\n" + "\n".join(f"Review: {_sentence(rng, words, 16)} Label: {w}"
                                              for w in ("good", "bad", "mixed"))
         for b in range(SHOTS)]
        for a in range(SYSTEMS)
    ]
    sys_of = rng.integers(0, SYSTEMS, rows)
    shot_of = rng.integers(0, SHOTS, rows)
    lens = rng.integers(35, 95, rows)
    chunk = 100_000
    writer = None
    tmp = table.with_suffix(".tmp")
    for c in range(0, rows, chunk):
        m = min(chunk, rows - c)
        idx = rng.integers(0, len(words), (m, 95))
        texts = [" ".join(words[i] for i in idx[k, : lens[c + k]].tolist()) + "." for k in range(m)]
        batch = pa.table({
            "id": pa.array(np.arange(c, c + m, dtype=np.int64)),
            "system": pa.array([systems[i] for i in sys_of[c : c + m].tolist()]).dictionary_encode(),
            "examples": pa.array([shots[a][b] for a, b in zip(sys_of[c : c + m].tolist(), shot_of[c : c + m].tolist())]).dictionary_encode(),
            "text": pa.array(texts),
        })
        if writer is None:
            writer = pq.ParquetWriter(tmp, batch.schema)
        writer.write_table(batch)
    assert writer is not None
    writer.close()
    os.replace(tmp, table)
    return table, template, tok_dir


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(mode: str, table: Path, template: Path, tok_dir: Path, out_json: Path) -> dict:
    """One measurement in this (fresh) process."""
    t0 = time.perf_counter()
    result: dict = {"mode": mode}
    if mode in ("tokenize", "tokenize_lists"):
        from batchllm_cli.analyze import prepare_analyze
        from batchllm_cli.analyze_types import DEFAULT_BATCH_ROWS, AnalyzeSettings
        from batchllm_cli.prompts import PromptEncoder

        prepared = prepare_analyze(AnalyzeSettings(input=table, template=str(template), tokenizer=tok_dir, chat=False))
        t1 = time.perf_counter()
        encoder = PromptEncoder(prepared.template, prepared.tokenizer, prepared.chat)
        rows = tokens = 0
        for batch in prepared.source.batches(DEFAULT_BATCH_ROWS):
            if mode == "tokenize":
                packed = encoder.encode_packed(batch)
                tokens += len(packed.tokens)
            else:
                tokens += sum(len(item.token_ids) for item in encoder.encode(batch))
            rows += batch.num_rows
        prepared.close()
        result.update(rows=rows, prompt_tokens=tokens, prepare_s=round(t1 - t0, 3),
                      tokenize_s=round(time.perf_counter() - t1, 3))
    else:
        from batchllm_cli.app import app

        args = ["analyze", str(table), "--template", str(template), "--tokenizer", str(tok_dir), "--no-chat",
                "--json", str(out_json)]
        if mode == "analyze_out_of_core":
            args.append("--out-of-core")
        try:
            app(args, standalone_mode=False)
        except SystemExit as exc:  # typer.Exit inside standalone_mode=False is returned, but be safe
            if exc.code:
                raise
        report = json.loads(out_json.read_text())
        result.update({k: report[k] for k in (
            "rows", "prompt_tokens", "unique_prompt_tokens", "sharing_ratio", "groups", "lru_prefill_tokens",
            "batchllm_prefill_tokens", "plan_prefill_tokens", "plan_mode", "memory_estimate_bytes",
            "tokenize_s", "lru_s", "plan_s", "report_s", "total_s", "trie_nodes",
        )})
    result["in_process_s"] = round(time.perf_counter() - t0, 3)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)  # all threads (the tokenizer's too)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def measure(mode: str, table: Path, template: Path, tok_dir: Path, out_json: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--table", str(table), "--template", str(template),
           "--tokenizer", str(tok_dir), "--child-json", str(out_json)]
    t = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    res = json.loads(done.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(wall, 3)  # process start to exit: interpreter, imports, everything
    res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res), file=sys.stderr, flush=True)
    return res


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "batchllm-bench-analyze")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each mode this many times, interleaved (the machine is shared: noisy)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--template", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.table, args.template, args.tokenizer, args.child_json)))
        return

    import numpy as np

    started = dt.datetime.now(dt.timezone.utc)
    results = []
    smallest = min(args.rows)
    for n in args.rows:
        t = time.perf_counter()
        table, template, tok_dir = build_inputs(args.cache, n)
        gen_s = round(time.perf_counter() - t, 1)
        modes = ["tokenize", "analyze"] + (["tokenize_lists", "analyze_out_of_core"] if n == smallest else [])
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        # Sizes above 200k rows run once, so the 1M measurement stays within ~10 minutes.
        for _ in range(args.repeat if n <= 200_000 else 1):
            for m in modes:
                runs[m].append(measure(m, table, template, tok_dir, args.cache / f"report_{n}_{m}.json"))
        # The best of the repeats: other work on the machine only ever adds time.
        best = {m: {k: min(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")} for m, rs in runs.items()}
        tok = best["tokenize"]
        entry = {
            "rows": n,
            "table": {"path": str(table), "bytes": table.stat().st_size, "generate_s": gen_s},
            "prompt_tokens": runs["analyze"][0]["prompt_tokens"],
            "tokens_per_row": round(runs["analyze"][0]["prompt_tokens"] / n, 1),
            "best": best,
            "over_tokenize": {
                m: {"wall": round(b["wall_s"] / tok["wall_s"], 3), "cpu": round(b["cpu_s"] / tok["cpu_s"], 3)}
                for m, b in best.items() if m != "tokenize"
            },
            "runs": runs,
        }
        results.append(entry)
    doc = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "date": started.isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "note": "2 CPU cores shared with other work; wall times include interpreter start and imports",
        },
        "tokenizer": f"byte-level BPE, {VOCAB} tokens, trained offline on the generator's words",
        "template": TEMPLATE,
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
