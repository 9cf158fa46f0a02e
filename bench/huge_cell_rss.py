"""Peak memory of `batchllm run` over a 3-row CSV whose middle cell holds N MB of text, against the same
run over 3 short rows: a huge cell should cost about its own size, not gigabytes of token encodings.

Each run is a fresh `python -m batchllm_cli run` subprocess with the demo model (CPU, --max-tokens 3);
its peak RSS is the child's ru_maxrss. With --code DIR the runs import batchllm from DIR (e.g. an
older checkout), to compare before/after on the same machine.

    python bench/huge_cell_rss.py --out bench/results/huge_cell_rss_cpu.json
    python bench/huge_cell_rss.py --code /tmp/old-checkout --sizes-mb 10 42
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_input(path: Path, cell_chars: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow([0, "hello"])
        w.writerow([1, ("lorem ipsum dolor " * (cell_chars // 18 + 1))[:cell_chars]])
        w.writerow([2, "world"])


def _run(code: Path, work: Path, cell_chars: int, extra: list[str]) -> dict:
    inp = work / f"in_{cell_chars}.csv"
    if not inp.exists():
        _write_input(inp, cell_chars)
    out = work / f"out_{cell_chars}_{'_'.join(extra) or 'plain'}.csv"
    (work / "t.j2").write_text("Say: {{ text }}", encoding="utf-8")
    cmd = [sys.executable, "-m", "batchllm_cli", "run", str(inp), "-t", str(work / "t.j2"), "-o", str(out),
           "--max-tokens", "3", "--no-chat", "--kv-cache-memory", "16MiB", "--restart", *extra]
    env = {**os.environ, "PYTHONPATH": str(code)}  # run from `work`: `-m` would put the cwd first on sys.path
    t0 = time.perf_counter()
    # Fork a middleman per run so RUSAGE_CHILDREN's maximum is this run's alone.
    probe = (
        "import resource,subprocess,sys,json;"
        "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "print(json.dumps({'rc':p.returncode,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        "'err':p.stderr.strip().splitlines()[-1:]}))"
    )
    res = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, cwd=work, capture_output=True, text=True, check=True)
    data = json.loads(res.stdout)
    return {
        "cell_mb": round(cell_chars / 1e6, 3),
        "flags": extra,
        "exit_code": data["rc"],
        "peak_rss_mib": round(data["rss"] / 1024, 1),
        "wall_s": round(time.perf_counter() - t0, 2),
        "last_line": data["err"][0] if data["err"] else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 42])
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose batchllm runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for chars, extra in [(5, [])] + [(int(mb * 1e6), e) for mb in args.sizes_mb for e in ([], ["--truncate", "right"])]:
            row = _run(args.code, work, chars, extra)
            print(json.dumps(row), flush=True)
            results.append(row)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.code, capture_output=True, text=True).stdout.strip()
    report = {
        "command": " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": str(args.code),
        "git_commit": commit or "(not a git checkout)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
