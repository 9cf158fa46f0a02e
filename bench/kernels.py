"""Shared-prefix decode attention vs the ways of doing without it (GPU benchmark).

One decode step of attention (one layer) for `rows` decode queries in groups of `degree` rows that
share a `prefix`-token prompt prefix, each with its own `suffix` tokens (the paper's microbenchmark
shape: prefix 2000, suffix 200, 32 query / 8 KV heads, head dim 128, bfloat16). Compared:

  shared        kernels.shared_prefix_decode: one launch of group tiles (each group's queries x one
                copy of its prefix) and request tiles (each query x its own suffix), LSE merge
  shared_split  the same with two launches, each compiled for one kind of tile
  (a) paged     kernels.paged_prefill with query length 1: plain paged decode attention, every row
                reads the whole prefix through its own block table
  nogroup       the shared kernel with no groups (split-KV decode over each row's whole context)
  (b) sdpa      torch scaled_dot_product_attention over per-row contiguous K/V (each row has its own
                copy of the prefix; the gather is not timed)
  (c) flex      FlexAttention over the unique K/V (each prefix once) with a group/suffix block mask
  shared.group_tiles / shared.request_tiles: the shared kernel with only one kind of tile (its own
                specialised launch, no merge), to see how close each runs to the copy bandwidth.

Bandwidth: `unique_kv_bytes` is the K/V any method must read at least (each prefix once + every
suffix); `eff_GBps` = unique_kv_bytes / time for every method, and `pct_copy` relates it to the
device's measured copy bandwidth (read + write of a large tensor). Methods that read the prefix per
row also report `own_GBps` = the bytes they read by design / time.

    python bench/kernels.py                    # H200-sized defaults, writes bench/results/kernels_<gpu>.json
    python bench/kernels.py --degrees 8 32 --rows 256 --block-size 16
    python bench/kernels.py --cpu-smoke        # tiny shapes in the Triton interpreter: checks the script only
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import copy_bandwidth, git_commit, results_path, timer  # noqa: E402  (bench/)

BF16_TOL = 3e-2  # max abs error vs the float32 reference accepted for bfloat16 outputs


@dataclasses.dataclass(frozen=True)
class Shape:
    rows: int
    degree: int
    prefix: int
    suffix: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def groups(self) -> int:
        return self.rows // self.degree

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_heads * self.head_dim * 2 * torch.tensor([], dtype=self.dtype).element_size()


@dataclasses.dataclass
class Workload:
    shape: Shape
    q: torch.Tensor  # [rows, heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: list[list[int]]
    context_lens: list[int]
    group_ids: list[int]
    prefix_lens: list[int]
    scale: float


def build_workload(s: Shape, device: torch.device, seed: int = 0) -> Workload:
    """Groups of `degree` consecutive rows; full prefix blocks shared, a partial last prefix block
    copied into each member's own block (copy on write); block ids shuffled."""
    bs = s.block_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    full = s.prefix // bs
    own = -(-(s.prefix + s.suffix) // bs) - full
    num_blocks = s.groups * full + s.rows * own
    ids = torch.randperm(num_blocks, generator=g).tolist()
    torch.manual_seed(seed)
    shape = (num_blocks, bs, s.kv_heads, s.head_dim)
    k_cache = torch.randn(shape, dtype=torch.float32, device=device).to(s.dtype)
    v_cache = torch.randn(shape, dtype=torch.float32, device=device).to(s.dtype)
    tables, group_ids = [], []
    for grp in range(s.groups):
        shared = [ids.pop() for _ in range(full)]
        first = None
        for _ in range(s.degree):
            mine = [ids.pop() for _ in range(own)]
            if s.prefix % bs:
                if first is None:
                    first = mine[0]
                else:  # identical prefix tokens in the copied partial block
                    k_cache[mine[0], : s.prefix % bs] = k_cache[first, : s.prefix % bs]
                    v_cache[mine[0], : s.prefix % bs] = v_cache[first, : s.prefix % bs]
            tables.append(shared + mine)
            group_ids.append(grp)
    q = torch.randn((s.rows, s.heads, s.head_dim), dtype=torch.float32, device=device).to(s.dtype)
    return Workload(
        shape=s, q=q, k_cache=k_cache, v_cache=v_cache, tables=tables,
        context_lens=[s.prefix + s.suffix] * s.rows, group_ids=group_ids, prefix_lens=[s.prefix] * s.rows,
        scale=s.head_dim**-0.5,
    )






def gather_rows(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row contiguous K/V [rows, kv_heads, context, head_dim] (each row its own prefix copy)."""
    s = w.shape
    ctx = s.prefix + s.suffix
    pos = torch.arange(ctx, device=w.q.device)
    tables = torch.tensor(w.tables, dtype=torch.int64, device=w.q.device)
    slots = tables[:, pos // s.block_size] * s.block_size + pos % s.block_size  # [rows, ctx]
    kf = w.k_cache.view(-1, s.kv_heads, s.head_dim)
    vf = w.v_cache.view(-1, s.kv_heads, s.head_dim)
    return kf[slots].transpose(1, 2).contiguous(), vf[slots].transpose(1, 2).contiguous()


def gather_unique(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, kv_heads, groups*prefix + rows*suffix, head_dim]: each prefix once, then every suffix."""
    s = w.shape
    dev = w.q.device
    tables = torch.tensor(w.tables, dtype=torch.int64, device=dev)
    bs = s.block_size
    pre_pos = torch.arange(s.prefix, device=dev)
    firsts = torch.arange(s.groups, device=dev) * s.degree
    pre = tables[firsts][:, pre_pos // bs] * bs + pre_pos % bs  # [groups, prefix]
    suf_pos = torch.arange(s.prefix, s.prefix + s.suffix, device=dev)
    suf = tables[:, suf_pos // bs] * bs + suf_pos % bs  # [rows, suffix]
    slots = torch.cat([pre.flatten(), suf.flatten()])
    kf = w.k_cache.view(-1, s.kv_heads, s.head_dim)
    vf = w.v_cache.view(-1, s.kv_heads, s.head_dim)
    return kf[slots].transpose(0, 1)[None].contiguous(), vf[slots].transpose(0, 1)[None].contiguous()


def sdpa_fn(w: Workload) -> Callable[[], torch.Tensor]:
    k, v = gather_rows(w)
    q = w.q[:, :, None, :]  # [rows, heads, 1, head_dim]
    try:
        F.scaled_dot_product_attention(q, k, v, scale=w.scale, enable_gqa=True)

        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, scale=w.scale, enable_gqa=True)[:, :, 0]
    except TypeError:  # torch without enable_gqa: materialise the repeated K/V once (not timed)
        r = w.shape.heads // w.shape.kv_heads
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)

        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, scale=w.scale)[:, :, 0]

    return run


def flex_fn(w: Workload) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = w.shape
    dev = w.q.device
    k, v = gather_unique(w)
    n_pre = s.groups * s.prefix
    degree, prefix, suffix = s.degree, s.prefix, s.suffix

    def mask_mod(b, h, q_idx, kv_idx):
        in_prefix = kv_idx < n_pre
        own_prefix = (kv_idx // prefix) == (q_idx // degree)
        own_suffix = ((kv_idx - n_pre) // suffix) == q_idx
        return (in_prefix & own_prefix) | (~in_prefix & own_suffix)

    block_mask = create_block_mask(mask_mod, None, None, s.rows, k.shape[2], device=dev)
    compiled = torch.compile(flex_attention, dynamic=False) if dev.type == "cuda" else flex_attention
    q = w.q.transpose(0, 1)[None]  # [1, heads, rows, head_dim]

    def run() -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask, scale=w.scale, enable_gqa=True)[0].transpose(0, 1)

    return run




def run_degree(s: Shape, device: torch.device, bench: Callable, copy_bps: float, args) -> dict:
    from kernels.attention_backend import TritonBackend
    from kernels.shared_prefix_attention import build_shared_prefix_batch, shared_prefix_decode_reference

    w = build_workload(s, device)
    backend = TritonBackend(group_block_m=args.block_m, kv_split=args.kv_split)
    rows = list(range(s.rows))
    build = dict(num_heads=s.heads, num_kv_heads=s.kv_heads)
    plan = backend.build_shared_prefix_metadata(rows, w.context_lens, w.tables, w.group_ids, w.prefix_lens,
                                                s.block_size, device, **build)
    plan_nogroup = backend.build_shared_prefix_metadata(rows, w.context_lens, w.tables, [None] * s.rows,
                                                        [0] * s.rows, s.block_size, device, **build)
    paged_meta = backend.build_paged_metadata([1] * s.rows, w.context_lens, w.tables, s.block_size, device, **build)
    out = torch.empty_like(w.q)
    from kernels.shared_prefix_decode import shared_prefix_decode

    opts = dict(block_n=args.block_n, block_n_row=args.block_n_row, num_warps=args.num_warps,
                num_stages=args.num_stages)

    def shared(p, fused: bool, dst: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: shared_prefix_decode(w.q, w.k_cache, w.v_cache, p, w.scale, out=dst, fused=fused, **opts)

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "shared": shared(plan, True, out),
        "shared_split": shared(plan, False, out),
        "paged": lambda: backend.paged_attention(w.q, w.k_cache, w.v_cache, paged_meta, w.scale, out=out),
        "nogroup": shared(plan_nogroup, True, out),
    }
    g = plan.num_group_tiles
    no_merge = plan.merge_rows[:0]
    only_group = dataclasses.replace(plan, tile_f0=plan.tile_f0[:g], tile_f1=plan.tile_f1[:g],
                                     tile_table=plan.tile_table[:g], tile_kv_lo=plan.tile_kv_lo[:g],
                                     tile_kv_hi=plan.tile_kv_hi[:g], tile_part=plan.tile_part[:g], merge_rows=no_merge)
    only_rows = dataclasses.replace(plan, tile_f0=plan.tile_f0[g:], tile_f1=plan.tile_f1[g:],
                                    tile_table=plan.tile_table[g:], tile_kv_lo=plan.tile_kv_lo[g:],
                                    tile_kv_hi=plan.tile_kv_hi[g:], tile_part=plan.tile_part[g:],
                                    num_group_tiles=0, group_tile_count=torch.zeros_like(plan.group_tile_count),
                                    merge_rows=no_merge)
    scratch = torch.empty_like(w.q)
    parts_only = {
        "shared.group_tiles": shared(only_group, False, scratch),
        "shared.request_tiles": shared(only_rows, False, scratch),
    }
    errors: dict[str, str] = {}
    for name, make in (("sdpa", sdpa_fn), ("flex", flex_fn)):
        try:
            methods[name] = make(w)
        except Exception as exc:  # noqa: BLE001 - a missing baseline is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]

    # correctness against the float32 reference (shared-prefix reference == plain attention)
    batch = build_shared_prefix_batch(rows, w.context_lens, w.tables, w.group_ids, w.prefix_lens, s.block_size, device)
    ref = shared_prefix_decode_reference(w.q.float(), w.k_cache.float(), w.v_cache.float(), batch, w.scale)
    max_err: dict[str, float] = {}
    for name, fn in list(methods.items()):
        try:
            got = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            max_err[name] = float((got.float() - ref).abs().max())
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            del methods[name]
    del ref

    unique = s.kv_bytes(s.groups * s.prefix + s.rows * s.suffix)
    per_row = s.kv_bytes(s.rows * (s.prefix + s.suffix))
    own_bytes = {"shared": unique, "shared_split": unique, "paged": per_row, "nogroup": per_row, "sdpa": per_row, "flex": unique,
                 "shared.group_tiles": s.kv_bytes(s.groups * s.prefix),
                 "shared.request_tiles": s.kv_bytes(s.rows * s.suffix)}
    results: dict[str, dict] = {}
    for name, fn in {**methods, **parts_only}.items():
        try:
            ms = bench(fn)
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        own = own_bytes[name] / (ms * 1e-3)
        r = {"ms": round(ms, 5), "own_GBps": round(own / 1e9, 1), "own_pct_copy": round(100 * own / copy_bps, 1)}
        if not name.startswith("shared."):
            eff = unique / (ms * 1e-3)
            r |= {"eff_GBps": round(eff / 1e9, 1), "pct_copy": round(100 * eff / copy_bps, 1),
                  "max_abs_err": max_err.get(name), "correct": max_err.get(name, 1e9) <= BF16_TOL}
        results[name] = r
    if "shared" in results:
        for name in ("shared_split", "paged", "nogroup", "sdpa", "flex"):
            if name in results:
                results[name]["shared_speedup"] = round(results[name]["ms"] / results["shared"]["ms"], 2)
    return {
        "degree": s.degree, "rows": s.rows, "groups": s.groups,
        "unique_kv_bytes": unique, "per_row_kv_bytes": per_row,
        "plan": {"group_tiles": plan.num_group_tiles, "tiles": plan.num_tiles, "block_m_group": plan.block_m_group,
                 "kv_split": plan.kv_split, "merged_rows": int(plan.merge_rows.numel())},
        "results": results, "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--degrees", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--rows", type=int, default=256, help="decode rows in the step (a multiple of every degree)")
    p.add_argument("--prefix", type=int, default=2000)
    p.add_argument("--suffix", type=int, default=200)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--block-m", type=int, default=None, help="rows of a group tile (default: kernel's)")
    p.add_argument("--kv-split", type=int, default=None, help="context positions per tile (default: kernel's)")
    p.add_argument("--block-n", type=int, default=None, help="positions per inner step of group tiles")
    p.add_argument("--block-n-row", type=int, default=None, help="positions per inner step of request tiles")
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernels_<gpu>.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU in the Triton interpreter: exercises the script, measures nothing")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.degrees, args.rows, args.prefix, args.suffix = [2, 4], 4, 21, 5
        args.heads, args.kv_heads, args.head_dim, args.block_size = 4, 2, 16, 4
        args.copy_gib, args.kv_split = 0.01, 8
        dtype = torch.float32
        gpu = "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "use --cpu-smoke to check the script on CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("TRITON_INTERPRET is set: unset it to benchmark compiled kernels.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtype = getattr(torch, args.dtype)
        gpu = torch.cuda.get_device_name(device)
    for d in args.degrees:
        if d < 1 or args.rows % d:
            p.error(f"--rows {args.rows} is not a multiple of degree {d}")

    bench = timer(device, args.warmup_ms, args.rep_ms)
    copy_bps = copy_bandwidth(device, bench, args.copy_gib)
    print(f"{gpu}: measured copy bandwidth {copy_bps / 1e9:.0f} GB/s", file=sys.stderr)
    runs = []
    for d in args.degrees:
        s = Shape(args.rows, d, args.prefix, args.suffix, args.heads, args.kv_heads, args.head_dim,
                  args.block_size, dtype)
        run = run_degree(s, device, bench, copy_bps, args)
        runs.append(run)
        for name, r in run["results"].items():
            extra = f" x{r['shared_speedup']}" if "shared_speedup" in r else ""
            ok = "" if "correct" not in r else ("  ok" if r["correct"] else f"  WRONG err={r['max_abs_err']}")
            print(f"degree {d:4d} {name:22s} {r['ms']:9.4f} ms  own {r['own_GBps']:7.1f} GB/s "
                  f"({r['own_pct_copy']:5.1f}% copy){extra}{ok}", file=sys.stderr)
        for name, err in run["errors"].items():
            print(f"degree {d:4d} {name:22s} unavailable: {err}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    by_degree = {r["degree"]: r["results"] for r in runs}
    goals = {}
    if 32 in by_degree and "paged" in by_degree[32]:
        sp = by_degree[32]["paged"].get("shared_speedup")
        goals["speedup_vs_paged_at_degree_32"] = {"value": sp, "goal": 5.0, "met": sp is not None and sp >= 5.0}
    req = [r["shared.request_tiles"]["own_pct_copy"] for r in by_degree.values() if "shared.request_tiles" in r]
    if req:
        goals["request_tiles_pct_copy_min"] = {"value": min(req), "goal": 70.0, "met": min(req) >= 70.0}
    goals["all_correct"] = all(r.get("correct", True) for res in by_degree.values() for r in res.values())

    import triton

    report = {
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_commit("kernels", "bench/kernels.py"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "shape": {"rows": args.rows, "prefix": args.prefix, "suffix": args.suffix, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size,
                  "dtype": str(dtype).replace("torch.", "")},
        "copy_GBps": round(copy_bps / 1e9, 1),
        "notes": "eff_GBps = unique KV bytes (each prefix once + all suffixes) / time; own_GBps = bytes the "
                 "method reads by design / time; pct = percent of the measured copy bandwidth; one layer.",
        "goals": goals,
        "runs": runs,
    }
    if args.out is None and not args.cpu_smoke:  # a smoke run writes only where it is told to
        args.out = results_path("kernels", gpu)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps(goals))
    return 0 if goals["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
