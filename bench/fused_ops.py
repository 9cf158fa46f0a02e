"""Fused add+RMSNorm and in-place RoPE Triton kernels vs the decoder's unfused PyTorch ops (GPU benchmark).

Per model size (Llama-3.2-1B: hidden 2048, head dim 64; Llama-3.1-8B: hidden 4096, head dim 128;
both 32 query / 8 KV heads) and token count, bfloat16:

  add_rms_norm  fused      kernels.rms_norm.fused_add_rms_norm
                torch      residual + x, then engine.models.decoder.RMSNorm's ops (eager)
                compiled   the same torch ops through torch.compile (a fair "let the compiler fuse it")
  rope          fused      kernels.rotary.rotary_embedding on q/k views of a qkv buffer, in place
                torch      the decoder's path: cos/sin gather + cast, apply_rope on q and k (eager)
                compiled   the same through torch.compile

`GBps` = the bytes the op must move at least (inputs read once, outputs written once) / time, the
same byte count for every method, so it compares like with like; `pct_copy` relates it to the
measured device copy bandwidth. Small token counts are launch-bound, not bandwidth-bound.

    python bench/fused_ops.py                 # writes bench/results/fused_ops_<gpu>.json
    python bench/fused_ops.py --tokens 1 4096 --models llama-3.1-8b
    python bench/fused_ops.py --cpu-smoke     # tiny shapes in the Triton interpreter: checks the script only
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # ahead of bench/, whose kernels.py would shadow the kernels package

from bench_common import copy_bandwidth, git_commit, results_path, timer  # noqa: E402  (bench/)

EPS = 1e-5
# max abs error vs the float32 reference (outputs up to ~8: a few units in the last place of bfloat16)
TOL = {torch.bfloat16: 0.125, torch.float16: 2e-2, torch.float32: 1e-4}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    m.name: m
    for m in (
        ModelShape("llama-3.2-1b", 2048, 32, 8, 64),
        ModelShape("llama-3.1-8b", 4096, 32, 8, 128),
    )
}
SMOKE_MODEL = ModelShape("smoke", 80, 4, 2, 16)






def torch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the decoder's unfused path: residual add in the model dtype, then RMSNorm with float32 statistics
    h = residual + x
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h32.to(h.dtype), h


def torch_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.models.rope import apply_rope

    # the decoder gathers cos/sin once per step for all layers; counted here since one layer is timed
    cos_sin = table[positions].to(q.dtype)
    cos, sin = cos_sin[:, 0:1], cos_sin[:, 1:2]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def maybe_compile(fn: Callable, device: torch.device) -> Callable | None:
    """torch.compile'd fn on CUDA (None elsewhere), specialised per shape like the decoder's ops."""
    if device.type != "cuda":
        return None
    import torch._dynamo

    # one compilation per (model, tokens) shape: past the default limit of 8, dynamo would
    # silently fall back to eager and the "compiled" column would time the eager ops
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


def measure(methods: dict[str, Callable[[], object]], check: Callable[[str], float], tol: float, nbytes: int,
            bench: Callable, copy_bps: float) -> tuple[dict, dict]:
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    max_err: dict[str, float] = {}
    for name in methods:  # every check before any timing: the in-place RoPE rotates its inputs further
        try:
            max_err[name] = check(name)
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    for name in max_err:
        try:
            ms = bench(methods[name])
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        bps = nbytes / (ms * 1e-3)
        err = max_err[name]
        results[name] = {"us": round(ms * 1e3, 2), "GBps": round(bps / 1e9, 1),
                         "pct_copy": round(100 * bps / copy_bps, 1), "max_abs_err": err, "correct": err <= tol}
    if "fused" in results:
        for name in results:
            results[name]["fused_speedup"] = round(results[name]["us"] / results["fused"]["us"], 2)
    return results, errors


def run_norm(m: ModelShape, tokens: int, dtype: torch.dtype, device: torch.device, bench: Callable,
             copy_bps: float) -> dict:
    from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference

    g = torch.Generator(device="cpu").manual_seed(tokens)
    x = torch.randn(tokens, m.hidden, generator=g).to(device, dtype)
    residual = (torch.randn(tokens, m.hidden, generator=g) * 4).to(device, dtype)
    weight = (torch.rand(m.hidden, generator=g) + 0.5).to(device, dtype)
    # float32 reference from the same rounded inputs (the residual sum is rounded to dtype first)
    ref_normed, _ = fused_add_rms_norm_reference(x.float(), residual.float(), weight.float(), EPS)
    compiled = maybe_compile(torch_add_rms_norm, device)
    fns = {"fused": lambda: fused_add_rms_norm(x, residual, weight, EPS),
           "torch": lambda: torch_add_rms_norm(x, residual, weight)}
    if compiled is not None:
        fns["compiled"] = lambda: compiled(x, residual, weight)

    def check(name: str) -> float:
        normed, new_residual = fns[name]()
        if not torch.equal(new_residual, residual + x):
            raise AssertionError("new residual differs from residual + x")
        return float((normed.float() - ref_normed).abs().max())

    element = x.element_size()
    nbytes = 4 * tokens * m.hidden * element + m.hidden * element  # read x, residual; write both; weight
    results, errors = measure(fns, check, TOL[dtype], nbytes, bench, copy_bps)
    return {"op": "add_rms_norm", "model": m.name, "tokens": tokens, "hidden": m.hidden, "bytes": nbytes,
            "results": results, "errors": errors}


def run_rope(m: ModelShape, tokens: int, dtype: torch.dtype, device: torch.device, bench: Callable,
             copy_bps: float, max_positions: int) -> dict:
    from engine.model_config import RopeConfig
    from engine.models.rope import rope_cache
    from kernels.rotary import rotary_embedding, rotary_embedding_reference

    g = torch.Generator(device="cpu").manual_seed(tokens)
    table = rope_cache(RopeConfig(rope_type="default", theta=500000.0), m.head_dim, max_positions).to(device)
    positions = torch.randint(0, max_positions, (tokens,), generator=g).to(device)
    q_size, kv_size = m.heads * m.head_dim, m.kv_heads * m.head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=g).to(device, dtype)

    def views(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = buf.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(tokens, m.heads, m.head_dim), k.view(tokens, m.kv_heads, m.head_dim)

    q, k = views(qkv)
    ref_q, ref_k = rotary_embedding_reference(q.float(), k.float(), positions, table)
    compiled = maybe_compile(torch_rope, device)
    fns = {"fused": lambda: rotary_embedding(q, k, positions, table),  # in place: repeats rotate further
           "torch": lambda: torch_rope(q, k, positions, table)}
    if compiled is not None:
        fns["compiled"] = lambda: compiled(q, k, positions, table)

    def check(name: str) -> float:
        if name == "fused":  # on a copy, so that the other methods still see the original q/k
            out_q, out_k = rotary_embedding(*views(qkv.clone()), positions, table)
        else:
            out_q, out_k = fns[name]()
        return max(float((out_q.float() - ref_q).abs().max()), float((out_k.float() - ref_k).abs().max()))

    element = qkv.element_size()
    # q and k read and written once; one cos and one sin half-row per token (float32) read
    nbytes = 2 * tokens * (q_size + kv_size) * element + tokens * m.head_dim * 4
    results, errors = measure(fns, check, TOL[dtype], nbytes, bench, copy_bps)
    return {"op": "rope", "model": m.name, "tokens": tokens, "heads": m.heads, "kv_heads": m.kv_heads,
            "head_dim": m.head_dim, "bytes": nbytes, "results": results, "errors": errors}




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096])
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--max-positions", type=int, default=8192, help="rows of the cos/sin table")
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/fused_ops_<gpu>.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU in the Triton interpreter, float32: exercises the script, measures nothing")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, gpu = torch.device("cpu"), torch.float32, "cpu-smoke"
        models, args.tokens = [SMOKE_MODEL], [1, 5]
        args.copy_gib, args.max_positions = 0.01, 64
    else:
        if not torch.cuda.is_available():
            print("bench/fused_ops.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "use --cpu-smoke to check the script on CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("TRITON_INTERPRET is set: unset it to benchmark compiled kernels.", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        gpu = torch.cuda.get_device_name(device)
        models = [MODELS[name] for name in args.models]
    if min(args.tokens) < 1:
        p.error("--tokens must be positive")

    bench = timer(device, args.warmup_ms, args.rep_ms)
    copy_bps = copy_bandwidth(device, bench, args.copy_gib)
    print(f"{gpu}: measured copy bandwidth {copy_bps / 1e9:.0f} GB/s", file=sys.stderr)
    runs = []
    for m in models:
        for tokens in args.tokens:
            for run in (run_norm(m, tokens, dtype, device, bench, copy_bps),
                        run_rope(m, tokens, dtype, device, bench, copy_bps, args.max_positions)):
                runs.append(run)
                for name, r in run["results"].items():
                    ok = "ok" if r["correct"] else f"WRONG err={r['max_abs_err']:.3g}"
                    print(f"{m.name:13s} {run['op']:12s} T={tokens:5d} {name:9s} {r['us']:9.2f} us "
                          f"{r['GBps']:8.1f} GB/s ({r['pct_copy']:5.1f}% copy) x{r['fused_speedup']} {ok}",
                          file=sys.stderr)
                for name, err in run["errors"].items():
                    print(f"{m.name:13s} {run['op']:12s} T={tokens:5d} {name:9s} unavailable: {err}", file=sys.stderr)

    all_correct = all(r["correct"] for run in runs for r in run["results"].values())
    fused_ran = all("fused" in run["results"] for run in runs)
    import triton

    report = {
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_commit("kernels/rms_norm.py", "kernels/rotary.py", "bench/fused_ops.py"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "dtype": str(dtype).replace("torch.", ""),
        "copy_GBps": round(copy_bps / 1e9, 1),
        "notes": "GBps = minimal bytes of the op (inputs read once, outputs written once) / median time, equal "
                 "for all methods; fused_speedup = method time / fused time; one layer's op.",
        "all_correct": all_correct and fused_ran,
        "runs": runs,
    }
    if args.out is None and not args.cpu_smoke:  # a smoke run writes only where it is told to
        args.out = results_path("fused_ops", gpu)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps({"all_correct": report["all_correct"]}))
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
