"""End to end on the BatchLLM paper workload: output tokens/s of `plan` vs `none` vs `lru` vs
transformers `generate`, and the fraction of a roofline each one reaches (GPU benchmark).

Model: the Llama-3.2-1B architecture (16 layers, hidden 2048, 32/8 heads, vocab 128256, tied
embeddings, llama3 RoPE) with random weights (normal, std 0.02; weights do not change the cost of a
forward pass), bfloat16 safetensors generated on the device once and cached under --model-cache.
The tokenizer is a word-level one with one entry per id: prompts are token ids, so it only has to
load, define EOS and decode.

Workload (the paper's microbenchmark, arXiv 2412.03594 / test_context_share_064.py): `groups` x
`degree` rows; each group has one random `prefix` (2000) and each row its own random `suffix` (200);
`output` (100) tokens per row, greedy, EOS ignored, so every row yields exactly `output` tokens.
The first token of every prefix is distinct, and so is the first suffix token within a group, so
the token trie is exactly the designed one. Rows are shuffled: `none`/`lru` see a table in no
useful order (what a user has before sorting) and `plan` must find the groups from the tokens.
transformers runs the first --hf-rows rows of that table in static left-padded batches.

Each engine mode gets a fresh engine, a warm-up run and then one timed `generate` over all rows;
counters are the timed run's (lifetime stats minus the warm-up's). The warm-up has the timed run's
shapes and other tokens, and by default enough groups to fill max_num_seqs: it compiles the Triton
kernels and meets the decode batch sizes whose CUDA graphs the engine captures on first use.

Roofline (the least time the device could take for this work; P/S/O = prefix/suffix/output,
G groups, d degree, R = G*d rows, N = non-embedding parameters, V*H = the (tied) output head,
Lyr/Hq/hd = layers/query heads/head dim, e = bytes per element):
  unique prompt tokens U = G*P + R*S                                (the trie's token count)
  prefill FLOPs  F = 2*N*U + 2*V*H*R + 4*Lyr*Hq*hd*C,   C = G*P(P+1)/2 + R*(S*P + S(S+1)/2)
                 (matmuls of each unique token once, the output head only for each row's last prompt
                 token, causal attention: a token at position p attends to p+1 positions)
  decode steps   the first output token comes from the prefill logits, so O-1 decode steps per row.
                 Ideal batch: whole groups decode together, as many as the KV cache holds
                 (g = floor(kv_capacity_tokens / (P + d*(S+O))) groups per wave, the engine's cache
                 size; max_num_seqs is ignored), waves run one after another.
  decode bytes   B = sum over waves, steps j=1..O-1 of
                     W + kvb*(g*P + g*d*(S+j))     W = all parameters * e, kvb = KV bytes per token
                 (weights read once per step; each shared prefix once per step per group; each row its
                 own suffix and generated tokens)
  roofline_s     = F / matmul_rate + B / copy_bandwidth;  roofline_fraction = roofline_s / wall_s
  single_batch_s = the same with every group in one wave (KV capacity ignored): the simpler
                 per-token bound, weights read once per output position for all rows.
matmul_rate: a bf16 8192^3 GEMM timed with CUDA events; copy_bandwidth: (read + write bytes) of a
4 GiB device copy / time. Decode FLOPs are reported (decode_flop_s) but not in the roofline; with
thousands of rows per step the decode matmuls take about as long as the decode bytes.

    python bench/e2e_paper.py --rows 1600 --hf-rows 256      # writes bench/results/e2e_paper_<gpu>.json
    python bench/e2e_paper.py --cpu-smoke --out /tmp/e2e.json  # tiny, CPU, float32: checks the script
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import cached_dir, copy_bandwidth, git_commit, results_path, timer  # noqa: E402  (bench/)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
FIRST_ID = 2  # ids 0 and 1 are BOS/EOS; prompts use only ordinary ids


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_original_max: int  # llama3 RoPE scaling's original_max_position_embeddings
    init_std: float

    def config_json(self, dtype: str) -> dict:
        # transformers-4 keys, as in the published Llama-3.2-1B config.json
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": self.rope_original_max},
            "vocab_size": self.vocab, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1, "initializer_range": self.init_std,
        }

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (self.intermediate, h),
                       p + "mlp.up_proj.weight": (self.intermediate, h),
                       p + "mlp.down_proj.weight": (h, self.intermediate)}
        return shapes

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.weight_shapes().values())

    @property
    def non_embedding_params(self) -> int:
        return self.num_params - self.vocab * self.hidden

    def kv_bytes_per_token(self, elt: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elt


LLAMA_32_1B = ModelSpec("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
                        intermediate=8192, vocab=128256, max_positions=131072, rope_original_max=8192,
                        init_std=0.02)
# Larger init in the smoke model: attention must matter to the greedy tokens, so that a wrong
# shared-prefix path would change them (with std 0.02 a tiny model echoes its current token).
SMOKE_MODEL = ModelSpec("smoke", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                        intermediate=128, vocab=512, max_positions=512, rope_original_max=32, init_std=0.2)


@dataclasses.dataclass(frozen=True)
class Workload:
    groups: int
    degree: int
    prefix: int
    suffix: int
    output: int
    seed: int

    @property
    def rows(self) -> int:
        return self.groups * self.degree

    @property
    def unique_prompt_tokens(self) -> int:
        return self.groups * self.prefix + self.rows * self.suffix

    def prompts(self, vocab: int) -> list[list[int]]:
        """Rows in shuffled table order (see the module docstring)."""
        rng = np.random.default_rng(self.seed)
        rows: list[list[int]] = []
        firsts = rng.choice(np.arange(FIRST_ID, vocab), self.groups, replace=False)
        for first in firsts:
            prefix = [int(first)] + rng.integers(FIRST_ID, vocab, self.prefix - 1).tolist()
            for s0 in rng.choice(np.arange(FIRST_ID, vocab), self.degree, replace=False):
                rows.append(prefix + [int(s0)] + rng.integers(FIRST_ID, vocab, self.suffix - 1).tolist())
        order = rng.permutation(len(rows))
        return [rows[i] for i in order]


# ---------------------------------------------------------------------------- model directory
def write_model_dir(spec: ModelSpec, out: Path, device: torch.device, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(spec.config_json(name), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    # random numbers drawn on the device: ~1.2G of them take minutes on a CPU
    g = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for key, shape in spec.weight_shapes().items():
        if key.endswith("norm.weight"):
            weights[key] = torch.ones(shape, dtype=dtype)
        else:
            weights[key] = (torch.randn(shape, generator=g, device=device) * spec.init_std).to(dtype).cpu()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    vocab = {BOS: 0, EOS: 1} | {f"t{i}": i for i in range(FIRST_ID, spec.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BOS, EOS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "unk_token": EOS}))


def ensure_model_dir(spec: ModelSpec, root: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """Cached by a hash of everything that goes into it; built in a temporary sibling and renamed
    into place so an interrupted build is never reused."""
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), str(dtype), "v1"]).encode()).hexdigest()[:10]
    target = root / f"e2e-{spec.name}-{key}"

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        write_model_dir(spec, tmp, device, dtype)
        print(f"built {target} in {time.perf_counter() - start:.0f}s", file=sys.stderr)

    return cached_dir(target, build)


# ---------------------------------------------------------------------------- device rates
@dataclasses.dataclass(frozen=True)
class Rates:
    matmul_flops: float  # FLOP/s of a large dense GEMM in the run's dtype
    copy_bps: float  # bytes read + written per second by a large copy
    gemm_n: int
    copy_gib: float


def measure_rates(device: torch.device, dtype: torch.dtype, gemm_n: int, copy_gib: float) -> Rates:
    bench = timer(device, warmup_ms=25, rep_ms=200)
    a = torch.randn(gemm_n, gemm_n, device=device).to(dtype)  # random data: zeros run faster than real inputs
    b = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    flops = 2 * gemm_n**3 / (bench(lambda: a @ b) * 1e-3)
    del a, b
    return Rates(flops, copy_bandwidth(device, bench, copy_gib), gemm_n, copy_gib)


# ---------------------------------------------------------------------------- roofline
@dataclasses.dataclass(frozen=True)
class Roofline:
    unique_prompt_tokens: int
    prefill_flops: float
    decode_bytes: float
    decode_bytes_single_batch: float
    decode_flops: float
    groups_per_wave: int
    waves: int
    prefill_s: float
    decode_s: float
    decode_flop_s: float
    roofline_s: float
    single_batch_s: float


def roofline(spec: ModelSpec, w: Workload, rates: Rates, kv_capacity_tokens: int, elt: int) -> Roofline:
    P, S, O, d = w.prefix, w.suffix, w.output, w.degree
    head = spec.vocab * spec.hidden
    attn = 4 * spec.layers * spec.heads * spec.head_dim  # FLOPs per query position per context position
    ctx = w.groups * P * (P + 1) // 2 + w.rows * (S * P + S * (S + 1) // 2)
    prefill = 2 * spec.non_embedding_params * w.unique_prompt_tokens + 2 * head * w.rows + attn * ctx
    weights, kvb, steps = spec.num_params * elt, spec.kv_bytes_per_token(elt), O - 1

    def wave_bytes(g: int) -> float:  # sum over j=1..O-1 of W + kvb*(g*P + g*d*(S+j))
        return steps * (weights + kvb * g * (P + d * S)) + kvb * g * d * O * (O - 1) / 2

    def decode_bytes(per_wave: int) -> tuple[float, int]:
        full, rest = divmod(w.groups, per_wave)
        return full * wave_bytes(per_wave) + (wave_bytes(rest) if rest else 0.0), full + bool(rest)

    per_wave = max(1, min(w.groups, kv_capacity_tokens // (P + d * (S + O))))
    decode, waves = decode_bytes(per_wave)
    single, _ = decode_bytes(w.groups)
    decode_ctx = w.rows * (steps * (P + S) + O * (O - 1) // 2)
    decode_flops = 2 * (spec.non_embedding_params + head) * w.rows * steps + attn * decode_ctx
    prefill_s = prefill / rates.matmul_flops
    return Roofline(
        unique_prompt_tokens=w.unique_prompt_tokens, prefill_flops=prefill, decode_bytes=decode,
        decode_bytes_single_batch=single, decode_flops=decode_flops, groups_per_wave=per_wave, waves=waves,
        prefill_s=prefill_s, decode_s=decode / rates.copy_bps, decode_flop_s=decode_flops / rates.matmul_flops,
        roofline_s=prefill_s + decode / rates.copy_bps, single_batch_s=prefill_s + single / rates.copy_bps)


# ---------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class ModeResult:
    mode: str
    rows: int
    wall_s: float
    load_s: float
    output_tokens: int
    tokens_per_s: float
    exact_output_tokens: bool  # every row produced exactly `output` tokens
    outputs_sha256: str
    prefill_tokens: int | None = None
    stats: dict | None = None  # EngineStats of the timed run
    rows_identical_to_plan: float | None = None
    # bfloat16 with random weights has near-tied logits: whole rows drift apart after a flip, but the
    # first token (from the prompt alone) should agree for nearly every row unless something is wrong
    first_token_same_as_plan: float | None = None
    roofline_fraction: float | None = None
    single_batch_fraction: float | None = None
    breakdown: dict | None = None  # --breakdown-rows: step times by kind and the kernels' device time


def digest(outputs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(o) for o in outputs]).encode()).hexdigest()


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_engine(model_dir: Path, mode: str, prompts: list[list[int]], warm: list[list[int]], w: Workload,
               args: argparse.Namespace) -> tuple[ModeResult, list[list[int]], int]:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model_dir=str(model_dir), device=args.device, dtype=args.dtype, prefix_sharing=mode,
        max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
        kv_cache_memory=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30),
        attention_backend=args.attention_backend, gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graphs=args.cuda_graphs))
    load_s = time.perf_counter() - start

    def generate(rows: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        done = {r.key: r for r in engine.generate((i, p, params) for i, p in enumerate(rows))}
        seconds = time.perf_counter() - t
        errors = [r.error for r in done.values() if r.error]
        if errors:
            raise RuntimeError(f"{mode}: engine returned errors: {errors[:3]}")
        return [list(done[i].token_ids) for i in range(len(rows))], seconds

    generate(warm, w.output)
    before = dataclasses.asdict(engine.stats())
    outputs, wall = generate(prompts, w.output)
    after = dataclasses.asdict(engine.stats())
    lifetime = ("peak_kv_blocks", "kv_blocks_total")  # not counters: the timed run's value is the lifetime one
    stats = {k: v if k in lifetime else v - before[k] for k, v in after.items()}
    breakdown = None
    if args.breakdown_rows:
        from step_breakdown import kernel_table, step_times

        sub = prompts[: args.breakdown_rows]
        breakdown = {"rows": len(sub), "steps": step_times(engine, sub, w.output),
                     "profile": kernel_table(engine, sub, w.output, torch.device(args.device))}
        top = breakdown["profile"]["kernels"][:5]
        print(f"{mode} breakdown ({len(sub)} rows): steps {breakdown['steps']}; device "
              f"{breakdown['profile']['device_time_s']}s; top {[(k['name'][:40], k['self_s']) for k in top]}",
              file=sys.stderr)
    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
    del engine
    free_device(torch.device(args.device))
    n = sum(map(len, outputs))
    return ModeResult(mode=mode, rows=len(prompts), wall_s=round(wall, 4), load_s=round(load_s, 2),
                      output_tokens=n, tokens_per_s=round(n / wall, 2),
                      exact_output_tokens=all(len(o) == w.output for o in outputs), outputs_sha256=digest(outputs),
                      prefill_tokens=stats["prefill_tokens"], stats=stats, breakdown=breakdown), outputs, capacity


@torch.inference_mode()
def run_transformers(model_dir: Path, prompts: list[list[int]], w: Workload,
                     args: argparse.Namespace) -> tuple[ModeResult, list[list[int]]]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would clutter the benchmark's log
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(args.device)
    model.eval()
    model.generation_config.eos_token_id = None  # ignore EOS: min_new_tokens = max_new_tokens below
    model.generation_config.pad_token_id = 1
    load_s = time.perf_counter() - start

    def generate(batch: Sequence[list[int]], new: int) -> list[list[int]]:
        width = max(map(len, batch))  # left padding (a no-op here: every prompt has P+S tokens)
        ids = torch.tensor([[1] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        return out[:, width:].tolist()

    generate(prompts[:2], min(4, w.output))  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), args.hf_batch_size):
        outputs += generate(prompts[i:i + args.hf_batch_size], w.output)
    wall = time.perf_counter() - t
    del model
    free_device(torch.device(args.device))
    n = sum(map(len, outputs))
    return ModeResult(mode="transformers", rows=len(prompts), wall_s=round(wall, 4), load_s=round(load_s, 2),
                      output_tokens=n, tokens_per_s=round(n / wall, 2),
                      exact_output_tokens=all(len(o) == w.output for o in outputs),
                      outputs_sha256=digest(outputs)), outputs


def same_rows(a: Sequence[list[int]], b: Sequence[list[int]], first: int | None = None) -> float:
    """Fraction of rows equal in a and b (in their first `first` tokens when given)."""
    return round(sum(x[:first] == y[:first] for x, y in zip(a, b)) / max(1, len(a)), 4)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=6400, help="rows (a multiple of --degree)")
    p.add_argument("--degree", type=int, default=16, help="rows per shared prefix")
    p.add_argument("--prefix", type=int, default=2000, help="shared prefix tokens per group")
    p.add_argument("--suffix", type=int, default=200, help="unique suffix tokens per row")
    p.add_argument("--output", type=int, default=100, help="generated tokens per row (EOS ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", choices=["plan", "none", "lru"], default=["plan", "none", "lru"])
    p.add_argument("--warmup-groups", type=int, default=None,
                   help="groups in each warm-up run (default: enough to fill --max-num-seqs)")
    p.add_argument("--hf-rows", type=int, default=512, help="rows transformers runs (0: skip it)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--breakdown-rows", type=int, default=0,
                   help="after each mode's timed run, run this many rows again timing each step and once more "
                        "under torch.profiler (kernel device times); 0: skip")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default: the engine's)")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="eager decode steps")
    p.add_argument("--gemm-n", type=int, default=8192, help="size of the GEMM that measures the matmul rate")
    p.add_argument("--copy-gib", type=float, default=4.0, help="size of the copy that measures bandwidth")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="where the random-weight model is built once "
                        "(default: $BATCHLLM_CACHE_DIR or ~/.cache/batchllm)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/e2e_paper_<gpu>.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model and workload on CPU in float32: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.rows, args.degree, args.prefix, args.suffix, args.output = 8, 4, 48, 8, 4
        args.hf_rows, args.hf_batch_size, args.max_batch_tokens, args.max_num_seqs = 8, 4, 64, 8
        args.kv_cache_gib, args.attention_backend, args.gemm_n, args.copy_gib = 0.01, "torch", 256, 0.0625
        args.device, args.dtype = "cpu", "float32"
    else:
        args.device, args.dtype = "cuda", "bfloat16"
    if args.rows % args.degree or args.rows < args.degree:
        p.error(f"--rows {args.rows} must be a positive multiple of --degree {args.degree}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            print("bench/e2e_paper.py needs a CUDA GPU; use --cpu-smoke to check the script on CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("TRITON_INTERPRET is set: unset it to benchmark compiled kernels.", file=sys.stderr)
            return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = SMOKE_MODEL if args.cpu_smoke else LLAMA_32_1B
    w = Workload(args.rows // args.degree, args.degree, args.prefix, args.suffix, args.output, args.seed)
    warm_groups = args.warmup_groups or -(-args.max_num_seqs // w.degree)
    warm_w = dataclasses.replace(w, groups=min(warm_groups, w.groups), seed=w.seed + 1)
    prompts, warm = w.prompts(spec.vocab), warm_w.prompts(spec.vocab)

    gpu = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(device)
    rates = measure_rates(device, dtype, args.gemm_n, args.copy_gib)
    print(f"{gpu}: matmul {rates.matmul_flops / 1e12:.1f} TFLOP/s, copy {rates.copy_bps / 1e9:.0f} GB/s",
          file=sys.stderr)
    from engine.demo_model import default_cache_root

    # the smoke model takes no time to build: it never touches the user's cache
    tmp = tempfile.TemporaryDirectory(prefix="batchllm-e2e-") if args.cpu_smoke else None
    root = Path(tmp.name) if tmp is not None else args.model_cache or default_cache_root()
    model_dir = ensure_model_dir(spec, root, device, dtype)

    results: dict[str, ModeResult] = {}
    outputs: dict[str, list[list[int]]] = {}
    capacity = 0
    for mode in args.modes:
        results[mode], outputs[mode], capacity = run_engine(model_dir, mode, prompts, warm, w, args)
        r = results[mode]
        print(f"{mode}: {r.wall_s:.2f}s {r.tokens_per_s:.0f} tok/s prefill {r.prefill_tokens}", file=sys.stderr)
    if args.hf_rows > 0:
        results["transformers"], outputs["transformers"] = run_transformers(model_dir, prompts[: args.hf_rows], w, args)
    if tmp is not None:
        tmp.cleanup()

    elt = torch.tensor([], dtype=dtype).element_size()
    roof = roofline(spec, w, rates, capacity, elt)
    ref = outputs.get("plan")
    for mode, r in results.items():
        engine = mode != "transformers"  # transformers ran other rows: no roofline of its own
        results[mode] = dataclasses.replace(
            r, rows_identical_to_plan=same_rows(outputs[mode], ref) if ref is not None else None,
            first_token_same_as_plan=same_rows(outputs[mode], ref, first=1) if ref is not None else None,
            roofline_fraction=round(roof.roofline_s / r.wall_s, 4) if engine else None,
            single_batch_fraction=round(roof.single_batch_s / r.wall_s, 4) if engine else None)
    speedups = {f"plan/{m}": round(results["plan"].tokens_per_s / results[m].tokens_per_s, 3)
                for m in results if "plan" in results and m != "plan"}
    plan, none = results.get("plan"), results.get("none")
    checks = {
        "outputs_identical": len({results[m].outputs_sha256 for m in args.modes}) == 1,
        "exact_output_tokens": all(r.exact_output_tokens for r in results.values()),
        "plan_prefill_equals_unique": plan.prefill_tokens == w.unique_prompt_tokens if plan else None,
        "plan_prefill_less_than_none": plan.prefill_tokens < none.prefill_tokens if plan and none else None,
    }
    vs_none, fraction = speedups.get("plan/none"), plan.roofline_fraction if plan else None
    goals = {"plan_vs_none": {"value": vs_none, "goal": 3.0, "met": vs_none is not None and vs_none >= 3.0},
             "plan_roofline_fraction": {"value": fraction, "goal": 0.5,
                                        "met": fraction is not None and fraction >= 0.5}}

    import transformers
    import triton

    report = {
        "benchmark": "e2e_paper",
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_commit("engine", "kernels", "bench/e2e_paper.py"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {**dataclasses.asdict(spec), "parameters": spec.num_params, "weights": "random",
                  "kv_bytes_per_token": spec.kv_bytes_per_token(elt)},
        "workload": {**dataclasses.asdict(w), "rows": w.rows, "unique_prompt_tokens": w.unique_prompt_tokens,
                     "prompt_tokens": w.rows * (w.prefix + w.suffix), "greedy": True, "ignore_eos": True,
                     "row_order": "shuffled"},
        "rates": {"matmul_TFLOPs": round(rates.matmul_flops / 1e12, 3), "copy_GBps": round(rates.copy_bps / 1e9, 2),
                  "gemm_n": rates.gemm_n, "copy_gib": rates.copy_gib},
        "kv_capacity_tokens": capacity,
        "roofline": dataclasses.asdict(roof),
        "results": {m: dataclasses.asdict(r) for m, r in results.items()},
        "speedups": speedups,
        "checks": checks,
        "goals": goals,
    }
    out = args.out
    if out is None and args.cpu_smoke:  # a smoke run never writes into bench/results
        out = Path(tempfile.mkstemp(prefix="e2e_paper_smoke_", suffix=".json")[1])
    elif out is None:
        out = results_path("e2e_paper", gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{gpu}, {spec.name} ({spec.num_params / 1e9:.2f}B), {w.rows} rows = {w.groups} x {w.degree}, "
          f"{w.prefix}/{w.suffix}/{w.output}; roofline {roof.roofline_s:.3f}s "
          f"(prefill {roof.prefill_s:.3f}s + decode {roof.decode_s:.3f}s, {roof.waves} waves)\n")
    print("| mode | rows | wall s | output tok/s | prefill tokens | % roofline | same as plan | 1st token same |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        pct = f"{100 * r.roofline_fraction:.1f}" if r.roofline_fraction is not None else "-"
        prefill = r.prefill_tokens if r.prefill_tokens is not None else "-"
        same, first = r.rows_identical_to_plan, r.first_token_same_as_plan
        print(f"| {m} | {r.rows} | {r.wall_s:.3f} | {r.tokens_per_s:.1f} | {prefill} | {pct} | {same} | {first} |")
    print(f"\nspeedups {speedups}\nchecks {checks}\ngoals {json.dumps(goals)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
