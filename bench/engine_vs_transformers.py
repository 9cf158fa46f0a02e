"""Output tokens/s of batchllm's engine vs transformers `generate` on the same greedy workload.

The model is a ~20M-parameter random-weight Llama built here (weights do not change the cost of a
forward pass, and no download is needed); the tokenizer is a byte-level BPE trained on a generated
pseudo-word corpus so the vocabulary (8k) has a realistic output-head cost. transformers runs the
prompts in fixed-size static batches in input order, left-padded with an attention mask: what a
plain `generate` loop over a table does. Both run greedy with EOS ignored, so both produce exactly
prompts x new_tokens tokens.

    python bench/engine_vs_transformers.py [--device cpu] [--prompts 64] [--new-tokens 64]

Writes JSON to bench/results/engine_vs_transformers_<device>.json and prints a markdown line.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


def pseudo_corpus(n_sentences: int, seed: int) -> list[str]:
    """Random words from random syllables: many distinct words, so BPE can learn 8k merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + "." for _ in range(n_sentences)]


def build_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pseudo_corpus(30000, seed=0), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], tok.token_to_id(SPECIALS[0]))])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "pad_token": SPECIALS[1], "unk_token": None}))
    return tok.get_vocab_size(with_added_tokens=True)


def build_model(out: Path, hidden: int, layers: int, vocab_size: int) -> int:
    """Random-weight Llama (GQA 2:1) saved as safetensors; returns the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = build_tokenizer(out, vocab_size)
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # BOS, then ordinary token ids (specials are 0 and 1)
    return [[0] + [rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi) - 1)] for _ in range(n)]


def run_engine(model_dir: Path, prompts: Sequence[list[int]], new_tokens: int, device: str) -> tuple[float, list[list[int]], dict]:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device=device, dtype="float32"))  # type: ignore[arg-type]
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    list(engine.generate([("warmup", prompts[0], warm)]))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = {r.key: r for r in engine.generate((i, p, params) for i, p in enumerate(prompts))}
    seconds = time.perf_counter() - start
    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise RuntimeError(f"engine returned errors: {errors[:3]}")
    # lifetime counters, warm-up request included
    return seconds, [list(results[i].token_ids) for i in range(len(prompts))], dataclasses.asdict(engine.stats())


@torch.inference_mode()
def run_transformers(model_dir: Path, prompts: Sequence[list[int]], new_tokens: int, batch_size: int,
                     device: str) -> tuple[float, list[list[int]]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS: always new_tokens tokens
    model.generation_config.pad_token_id = 1

    def generate(batch: Sequence[list[int]], max_new: int) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[1] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new)
        return out[:, width:].tolist()

    generate(prompts[:2], 4)  # warm-up
    start = time.perf_counter()
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        outputs += generate(prompts[i:i + batch_size], new_tokens)
    return time.perf_counter() - start, outputs


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="batchllm-bench-") as tmp:
        model_dir = Path(tmp)
        n_params = build_model(model_dir, args.hidden, args.layers, args.vocab)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(args.prompts, args.min_len, args.max_len, vocab, seed=1)
        eng_s, eng_out, eng_stats = run_engine(model_dir, prompts, args.new_tokens, args.device)
        hf_s, hf_out = run_transformers(model_dir, prompts, args.new_tokens, args.hf_batch_size, args.device)

    eng_tokens, hf_tokens = sum(map(len, eng_out)), sum(map(len, hf_out))
    # Padded batches change float summation order, so a few rows may drift after a near tie; most
    # should match exactly. This is a sanity check, not a correctness test (tests/ does that).
    same = sum(a == b for a, b in zip(eng_out, hf_out)) / len(prompts)
    eng_tps, hf_tps = eng_tokens / eng_s, hf_tokens / hf_s
    result = {
        "benchmark": "engine_vs_transformers",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, "hidden": args.hidden,
                  "layers": args.layers, "vocab": vocab, "dtype": "float32", "weights": "random"},
        "workload": {"prompts": args.prompts, "prompt_len": [args.min_len, args.max_len],
                     "prompt_tokens": sum(map(len, prompts)), "new_tokens": args.new_tokens,
                     "greedy": True, "ignore_eos": True},
        "engine": {"seconds": round(eng_s, 3), "output_tokens": eng_tokens, "tokens_per_s": round(eng_tps, 1),
                   "stats": eng_stats},
        "transformers": {"seconds": round(hf_s, 3), "output_tokens": hf_tokens, "tokens_per_s": round(hf_tps, 1),
                         "batch_size": args.hf_batch_size, "padding": "left"},
        "speedup": round(eng_tps / hf_tps, 3),
        "rows_identical_to_transformers": round(same, 3),
    }
    out = args.out or REPO / "bench" / "results" / f"engine_vs_transformers_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"| {args.device} | {n_params / 1e6:.1f}M Llama | {args.prompts}x{args.new_tokens} tok | "
          f"engine {eng_tps:.0f} tok/s | transformers (bs {args.hf_batch_size}) {hf_tps:.0f} tok/s | "
          f"{eng_tps / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
