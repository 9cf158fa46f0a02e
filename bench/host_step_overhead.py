"""Host time of one engine step with the device work taken out: what a GPU step costs the CPU
(scheduling, step metadata including the Triton attention plan, sampling bookkeeping) and so the
least time a step can take however fast the GPU is. A 1B model's decode step of 256 rows is about
1-2 ms of H200 time, so host time of that order decides decode throughput.

The model's forward and output head are replaced by stand-ins returning zeros (the attention metadata and step
context are still built exactly as for the Triton backend; no kernel runs), and sampling is greedy
over a tiny vocabulary. Workload: `groups` x `degree` rows with a shared prefix, decode-heavy.

    python bench/host_step_overhead.py [--groups 16 --degree 16 --prefix 2000 --suffix 200 --output 64]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend's planners only; no kernel runs

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import model_factory  # noqa: E402  (tiny HF model directories)
from bench_common import git_commit  # noqa: E402  (bench/)
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def stub_engine(model_dir: Path, rows: int, tokens_per_row: int, graph_path: bool = False) -> tuple[LLMEngine, list[bool]]:
    """An engine on the Triton backend whose forward and output head do no work; the returned flag
    says whether the last step was decode-only. graph_path: decode steps take the CUDA-graph path's
    host work (static buffers and decode plan filled each step; nothing captured), as on a GPU."""
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", attention_backend="triton",
                                    max_batch_tokens=8192, max_num_seqs=rows, kv_cache_tokens=rows * tokens_per_row))
    runner = engine.runner
    runner.model.use_fused_kernels(False)
    # plan tiles as on a GPU (the interpreter's defaults cut far smaller tiles)
    runner.attention_backend.kv_split, runner.attention_backend.group_block_m = 512, 64
    hidden = runner.model_cfg.hidden_size
    runner.model.forward = lambda ids, pos, ctx: torch.zeros(ids.shape[0], hidden)  # no device work
    logits = torch.zeros(rows + 8192, 16)  # a 16-token vocabulary: sampling costs next to nothing
    runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    if graph_path:
        runner.decode_graphs = runner.make_decode_graphs(capture=False)
    decode_only = [False]
    original_run = runner.run

    def run(chunks, *args, **kwargs):
        decode_only[0] = bool(chunks) and all(c.num_tokens == 1 for c in chunks)
        return original_run(chunks, *args, **kwargs)

    runner.run = run
    return engine, decode_only


def median_ms(xs: list[float]) -> float:
    return round(sorted(xs)[len(xs) // 2] * 1e3, 3) if xs else float("nan")


def one_run(model_dir: Path, rows: list[list[int]], output: int, graph_path: bool) -> dict:
    engine, decode_only = stub_engine(model_dir, len(rows), len(rows[0]) + output, graph_path)
    params = SamplingParams(max_tokens=output, ignore_eos=True)
    wall: list[float] = []
    cpu: list[float] = []  # process CPU time: less sensitive to other load on a shared machine
    engine.add_planned([(i, r, params) for i, r in enumerate(rows)])
    while engine.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        if decode_only[0]:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"steps": engine.stats().steps, "decode_steps": len(wall), "decode_step_ms_median": median_ms(wall),
            "decode_step_cpu_ms_median": median_ms(cpu)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--degree", type=int, default=16)
    p.add_argument("--prefix", type=int, default=2000)
    p.add_argument("--suffix", type=int, default=200)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--path", choices=["graph", "eager"], default="graph",
                   help="decode steps through the CUDA-graph path's host work (a GPU's) or the eager one")
    p.add_argument("--repeat", type=int, default=3, help="runs; the least median counts (a shared machine only adds)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = model_factory.VARIANTS["llama_gqa"]
    context = args.prefix + args.suffix + args.output + 16
    variant = dataclasses.replace(base, config={**base.config, "max_position_embeddings": context})
    model_dir = model_factory.build_model_dir(variant, Path(tempfile.mkdtemp()))
    rng = random.Random(0)
    vocab = model_factory.tokenizer_size() - 10
    rows: list[list[int]] = []
    for _ in range(args.groups):
        prefix = [rng.randrange(10, vocab) for _ in range(args.prefix)]
        rows += [prefix + [rng.randrange(10, vocab) for _ in range(args.suffix)] for _ in range(args.degree)]
    runs = [one_run(model_dir, rows, args.output, args.path == "graph") for _ in range(args.repeat)]
    best = min(r["decode_step_ms_median"] for r in runs)
    print(f"{len(rows)} rows, {args.path} path, {runs[0]['decode_steps']} decode-only steps per run: median host time per decode step "
          f"{', '.join(str(r['decode_step_ms_median']) for r in runs)} ms; least {best} ms")
    if args.out:
        report = {"bench": "host_step_overhead", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                  "git": git_commit("engine", "kernels"), "rows": len(rows), "decode_step_ms_least_median": best,
                  "runs": runs, "params": {k: v for k, v in vars(args).items() if k != "out"}}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
