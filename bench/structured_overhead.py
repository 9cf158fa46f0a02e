"""Throughput of constrained (structured output) decoding against unconstrained decoding on the same job.

The cost of a constraint is host work per generated token (filling each row's grammar bitmask, advancing
its matcher) plus one masked-fill of the logits, so it is measured with a realistic vocabulary: a small
random-weight Llama (hidden 256, 4 layers) whose tokenizer is a 32k-token byte-level BPE trained
offline on the Python standard library's sources (no downloads). The model is small, so the forward
pass is cheap and the grammar's share of a step is larger than it would be with a real model: this is a
pessimistic estimate.

Each round runs the job unconstrained and then under each constraint on one engine (grammars compile in
a warm-up round); rounds are interleaved so that load on a shared machine hits every setting alike.
Reported: generated tokens per second (min and median over rounds), the overhead of the median (the
issue's metric), the share of the job's wall time the main thread spends in the grammar path (waiting for
the mask, applying it, advancing matchers: what the job pays) and the share the mask fill takes on its
worker thread (it overlaps the forward pass, so it is paid only where it outlasts it). `choices` answers are a few tokens long, so its
tokens/s is dominated by prefill and is not comparable; its grammar share is.
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


GRAMMAR_S = [0.0]  # main-thread seconds in the structured-output path (mask wait, mask apply, matcher advance)
FILL_S = [0.0]  # worker-thread seconds filling masks (overlapping the forward pass)


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
    engine.grammar.accept = timed(engine.grammar.accept, GRAMMAR_S)


def one_job(engine: LLMEngine, rows: list[list[int]], params: SamplingParams) -> tuple[float, int, int, float, float]:
    GRAMMAR_S[0] = FILL_S[0] = 0.0
    t = time.perf_counter()
    results = list(engine.generate((i, r, params) for i, r in enumerate(rows)))
    elapsed = time.perf_counter() - t
    cut = sum(r.finish_reason == "length" for r in results)
    return elapsed, sum(r.completion_tokens for r in results), cut, GRAMMAR_S[0], FILL_S[0]


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
    rows = prompts(engine, args.rows)
    params = {name: SamplingParams(max_tokens=args.max_tokens, structured=spec) for name, spec in CONSTRAINTS.items()}
    compile_s = {}
    for name, p in params.items():  # warm-up round: grammars compile here (once per job in a real run)
        t = time.perf_counter()
        one_job(engine, rows, p)
        compile_s[name] = round(time.perf_counter() - t, 3)
    rates: dict[str, list[float]] = {name: [] for name in params}
    shares: dict[str, list[float]] = {name: [] for name in params}
    fill_shares: dict[str, list[float]] = {name: [] for name in params}
    cut: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, p in params.items():
            elapsed, n, lengths, grammar_s, fill_s = one_job(engine, rows, p)
            rates[name].append(n / elapsed)
            shares[name].append(grammar_s / elapsed)
            fill_shares[name].append(fill_s / elapsed)
            tokens[name], cut[name] = n, lengths
    base = statistics.median(rates["none"])
    settings = {
        name: {
            "tokens_per_s_min": round(min(r), 1),
            "tokens_per_s_median": round(statistics.median(r), 1),
            "tokens_per_s_max": round(max(r), 1),
            "overhead_of_median_pct": round(100 * (1 - statistics.median(r) / base), 1),
            "overhead_of_max_pct": round(100 * (1 - max(r) / max(rates["none"])), 1),
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
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "xgrammar": importlib.metadata.version("xgrammar")},
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
