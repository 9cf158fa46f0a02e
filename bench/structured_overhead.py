"""Throughput of constrained (structured output) decoding against unconstrained decoding on the same job.

The cost of a constraint is host work per generated token (advancing each row's matcher, filling its
grammar bitmask) plus one masked add to the logits, so it is measured with a realistic vocabulary: a small
random-weight Llama (hidden 256, 4 layers) whose tokenizer is a 32k-token byte-level BPE trained
offline on the Python standard library's sources (no downloads). The model is small, so the forward
pass is cheap and the grammar's share of a step is larger than it would be with a real model: this is a
pessimistic estimate.

Each round runs the job unconstrained and then under each constraint on one engine (grammars compile in
a warm-up round); rounds are interleaved, each starting one setting later than the last, so that load
on a shared machine hits every setting alike.
`regex_uncached` is the `regex` language spelled apart and kept out of the per-DFA-state mask cache
(engine/mask_cache.py): the regex as it cost before that cache, measured in the same rounds.
Reported: generated tokens per second (min and median over rounds), the overhead of the median (the
issue's metric), the median of each round's overhead against that round's unconstrained job (paired),
the overhead in tokens per CPU-second of this process (the work a constraint adds, less sensitive to
other processes on a shared host), the share of the job's wall time the main thread spends in the
grammar path (waiting for the mask, applying it: what the job pays) and the share the mask worker takes
(advancing matchers, filling or copying masks, expanding them into a bias; it overlaps the forward pass,
so it is paid only where it outlasts it or where the cores are all busy). `choices` answers are a few
tokens long, so its tokens/s is dominated by prefill and is not comparable; its grammar share is.
Random weights make most constrained answers run to --max-tokens (long free strings), so every setting
generates about the same number of tokens.

    python bench/structured_overhead.py [--rows 32 --max-tokens 32 --rounds 3]
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import git_commit, results_path  # noqa: E402  (bench/)
from engine.config import EngineConfig  # noqa: E402
from engine.grammar import StructuredOutput  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

EOS = "<|eos|>"
CONSTRAINTS = {
    "none": None,
    "choices": StructuredOutput.choices(["positive", "negative", "neutral", "mixed", "not applicable"]),
    "regex": StructuredOutput("regex", r"[A-Z][a-z]+( [a-z]+)*\."),
    # the same language, spelled apart so that its masks are never cached (set in main): the regex before
    # engine/mask_cache.py, measured in the same rounds
    "regex_uncached": StructuredOutput("regex", r"[A-Z][a-z]+( [a-z]+)*[.]"),
    "json_schema": StructuredOutput("json_schema", json.dumps({
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "summary": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["label", "score", "summary", "tags"],
    })),
}


def build_model(out: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))[:1500]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "unk_token": None}))
    eos_id = tok.token_to_id(EOS)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=eos_id, bos_token_id=None, initializer_range=0.1)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def prompts(engine: LLMEngine, rows: int) -> list[list[int]]:
    texts = [f"Review {i}: the kettle {'boils fast' if i % 2 else 'broke after a week'}; rate it. Answer:"
             for i in range(rows)]
    return engine.tokenizer.encode_batch(texts)


GRAMMAR_S = [0.0]  # main-thread seconds in the structured-output path (mask wait, mask apply)
FILL_S = [0.0]  # mask-worker seconds (matcher advance, mask fill, bias), overlapping the forward pass


def timed(fn, total: list[float]):  # noqa: ANN001, ANN201
    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            total[0] += time.perf_counter() - t
    return wrapper


def instrument(engine: LLMEngine) -> None:
    """Time the grammar path itself: on a loaded shared machine, its share of a job's time is a steadier
    measure of the overhead than a difference of two noisy throughputs."""
    import engine.model_runner as model_runner

    begin_step = engine.grammar.begin_step
    model_runner.apply_token_mask = timed(model_runner.apply_token_mask, GRAMMAR_S)
    engine.grammar.step_mask = timed(engine.grammar.step_mask, FILL_S)
    engine.grammar.begin_step = lambda seqs: timed(begin_step(seqs), GRAMMAR_S)  # times the wait for the mask


def one_job(
    engine: LLMEngine, rows: list[list[int]], params: SamplingParams
) -> tuple[float, float, int, int, float, float]:
    """(wall s, process CPU s, completion tokens, rows cut by max tokens, grammar s, fill s)"""
    GRAMMAR_S[0] = FILL_S[0] = 0.0
    t, cpu = time.perf_counter(), time.process_time()
    results = list(engine.generate((i, r, params) for i, r in enumerate(rows)))
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    cut = sum(r.finish_reason == "length" for r in results)
    return elapsed, cpu, sum(r.completion_tokens for r in results), cut, GRAMMAR_S[0], FILL_S[0]


LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/batchllm-bench-structured-model"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    model_dir = build_model(args.model_dir, args.vocab)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device=args.device, dtype="float32",
                                    kv_cache_tokens=args.rows * 256, max_num_seqs=args.rows))
    instrument(engine)
    engine.grammar._caches[CONSTRAINTS["regex_uncached"]] = None  # noqa: SLF001  (the baseline: no mask cache)
    rows = prompts(engine, args.rows)
    params = {name: SamplingParams(max_tokens=args.max_tokens, structured=spec) for name, spec in CONSTRAINTS.items()}
    compile_s = {}
    for name, p in params.items():  # warm-up round: grammars compile here (once per job in a real run)
        t = time.perf_counter()
        one_job(engine, rows, p)
        compile_s[name] = round(time.perf_counter() - t, 3)
    rates: dict[str, list[float]] = {name: [] for name in params}
    cpu_rates: dict[str, list[float]] = {name: [] for name in params}
    shares: dict[str, list[float]] = {name: [] for name in params}
    fill_shares: dict[str, list[float]] = {name: [] for name in params}
    cut: dict[str, int] = {}
    tokens: dict[str, int] = {}
    order = list(params.items())
    for round_no in range(args.rounds):
        # each round starts one setting later: no setting always runs first (or right after another one)
        for name, p in order[round_no % len(order):] + order[: round_no % len(order)]:
            elapsed, cpu, n, lengths, grammar_s, fill_s = one_job(engine, rows, p)
            rates[name].append(n / elapsed)
            cpu_rates[name].append(n / cpu)
            shares[name].append(grammar_s / elapsed)
            fill_shares[name].append(fill_s / elapsed)
            tokens[name], cut[name] = n, lengths
    base = statistics.median(rates["none"])
    cpu_base = statistics.median(cpu_rates["none"])
    settings = {
        name: {
            "tokens_per_s_min": round(min(r), 1),
            "tokens_per_s_median": round(statistics.median(r), 1),
            "tokens_per_s_max": round(max(r), 1),
            "overhead_of_median_pct": round(100 * (1 - statistics.median(r) / base), 1),
            "overhead_of_max_pct": round(100 * (1 - max(r) / max(rates["none"])), 1),
            # each round's job against that round's unconstrained job: load that drifts between rounds cancels
            "overhead_paired_median_pct": round(
                100 * statistics.median(1 - x / b for x, b in zip(r, rates["none"], strict=True)), 1),
            # tokens per second of this process's CPU time (both threads): what the constraint costs in work,
            # less sensitive than wall time to other processes on a shared host
            "cpu_tokens_per_s_median": round(statistics.median(cpu_rates[name]), 1),
            "cpu_overhead_of_median_pct": round(100 * (1 - statistics.median(cpu_rates[name]) / cpu_base), 1),
            "grammar_share_of_job_time_pct_median": round(100 * statistics.median(shares[name]), 2),
            "mask_fill_share_on_worker_pct_median": round(100 * statistics.median(fill_shares[name]), 2),
            "completion_tokens": tokens[name],
            "rows_cut_by_max_tokens": cut[name],
            "first_job_s": compile_s[name],
        }
        for name, r in rates.items()
    }
    result = {
        "benchmark": "structured_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit("engine", "bench/structured_overhead.py"),
        "command": " ".join(["python", "bench/structured_overhead.py", *sys.argv[1:]]),
        "host": {"machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                 "load_average_at_start": LOAD_AT_START, "torch": torch.__version__,
                 "xgrammar": importlib.metadata.version("xgrammar"), "gpu": None},
        "device": args.device,
        "workload": {"rows": args.rows, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "vocab_size": engine.model_config.vocab_size, "model": "Llama hidden 256, 4 layers, random"},
        "settings": settings,
    }
    out = results_path("structured_overhead", args.device)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(settings, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
