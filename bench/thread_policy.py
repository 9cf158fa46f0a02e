"""How much a concurrent CPU hog slows the engine under each OpenMP thread setting (CPU).

Each setting runs bench/engine_cpu_profile.py (a short doc-QA plan job and a no-sharing job) in a
fresh process, without and with `--hogs` busy-loop processes (`python -c 'while 1: pass'`) on the
same cores; settings and hog/no-hog runs are interleaved round by round (the machine may be shared,
so only same-round comparisons mean much), and min / median engine seconds are reported with the
slowdown hog/no-hog of the medians.

Settings (environment of the engine process):
  default:  nothing set: the engine's policy (engine/threads.py: passive after a short spin;
            engine/thread_governor.py: as many threads as the CPUs other processes leave)
  spin:     OMP_WAIT_POLICY=ACTIVE (waiting threads spin; libgomp's default spins a while, then sleeps)
  passive:  OMP_WAIT_POLICY=PASSIVE (no spin), all cores while the CPUs are free
  one:      BATCHLLM_NUM_THREADS=1 (one intra-op thread)
  pinned:   OMP_WAIT_POLICY=PASSIVE + OMP_PROC_BIND=true (threads bound to cores)
  spin20k, spin200k: PASSIVE + GOMP_SPINCOUNT=20000 / 200000 (spin that long, then sleep)

    python bench/thread_policy.py [--rounds 2] [--hogs 1] [--groups 3]
Writes bench/results/thread_policy_<label>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_common import git_commit, results_path, write_results  # noqa: E402

SETTINGS = {
    "default": {},  # the engine's own: a short spin (GOMP_SPINCOUNT=20000), threads follow the free CPUs
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"OMP_WAIT_POLICY": "PASSIVE", "BATCHLLM_NUM_THREADS": "1"},
    "pinned": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_PROC_BIND": "true"},
    # libgomp: a waiting thread spins this many times, then sleeps (PASSIVE alone: 0, ACTIVE: 3e10)
    "spin20k": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"},
    "spin200k": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "200000"},
}
LINE = re.compile(r"^round \d+ (\w+): engine ([0-9.]+)s")


def run_once(setting: str, groups: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BATCHLLM_NUM_THREADS", "OMP_PROC_BIND", "GOMP_SPINCOUNT")}
    env |= {k: v for k, v in SETTINGS[setting].items() if v}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "engine_cpu_profile.py"), "--groups", str(groups),
                           "--rounds", "1", "--no-write"], env=env, capture_output=True, text=True, timeout=1800)
    times = {m.group(1): float(m.group(2)) for m in map(LINE.match, proc.stderr.splitlines()) if m}
    if not times:
        raise RuntimeError(f"{setting}: no timings\n{proc.stderr[-2000:]}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hogs", type=int, default=1)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    p.add_argument("--label", default="cpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {"quiet": [], "hog": []} for s in args.settings}
    for r in range(args.rounds):
        for load in ("quiet", "hog"):
            hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.hogs if load == "hog" else 0)]
            try:
                for s in args.settings:
                    t = run_once(s, args.groups)
                    runs[s][load].append(t)
                    print(f"round {r} {load} {s}: " + " ".join(f"{k} {v:.2f}s" for k, v in t.items()), file=sys.stderr)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    summary: dict[str, dict] = {}
    for s, by_load in runs.items():
        summary[s] = {}
        for job in by_load["quiet"][0]:
            q = [t[job] for t in by_load["quiet"]]
            h = [t[job] for t in by_load["hog"]]
            summary[s][job] = {"quiet_min": min(q), "quiet_median": statistics.median(q), "hog_min": min(h),
                               "hog_median": statistics.median(h),
                               "slowdown_median": round(statistics.median(h) / statistics.median(q), 2)}
    result = {
        "bench": "thread_policy", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "git": git_commit("engine", "kernels"),
        "hogs": args.hogs, "groups": args.groups, "rounds": args.rounds, "summary": summary, "runs": runs,
        "note": "quiet = no hog of ours; the machine was shared with other jobs throughout",
    }
    print(json.dumps(summary, indent=1))
    if not args.no_write:
        write_results(results_path("thread_policy", args.label), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
