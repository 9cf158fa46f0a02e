"""Wall time of a one-row job from the shell, and where it goes (CPU, the demo model).

Each round runs, each in a fresh Python process and interleaved (the machine may be shared, so
only same-round comparisons mean much):
  run:          batchllm run ONE_ROW.csv --template T.j2 --output out.parquet --model DEMO --max-tokens 8
  help:         batchllm --help (the CLI's own start: imports without torch)
  import_torch: python -c "import torch" (the floor of any run that loads a model)
  baseline:     with --baseline COMMIT, the same `run` with that commit's code (`git archive` into a
                temporary directory), for a before/after in the same rounds
The `run` process is started through a small driver that times the job's phases from wall-clock
timestamps (functions of batchllm_cli wrapped in place, nothing else changed): imports of the CLI,
prepare_run (of it: check_model_files, which imports torch and the engine, and build_fingerprint,
which hashes the weights), the model load, the global-plan thread (it runs while the weights load),
the engine's generation, write_final (DuckDB) and, of it, the completion marker. `total` is the
parent's wall time from spawn to exit. Min and median per phase are reported.

    python bench/startup.py [--rounds 7] [--baseline COMMIT] [--no-write]
Writes bench/results/startup_cpu.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_common import git_commit, results_path, write_results  # noqa: E402

# Runs inside the job's process: wraps the phase functions, then runs the CLI as `batchllm` would.
_DRIVER = r"""
import atexit, functools, json, os, sys, time
T0 = float(os.environ["STARTUP_BENCH_T0"])
marks = {"interpreter": [0.0, time.time() - T0]}
t = time.time()
import batchllm_cli.app as app
marks["cli_imports"] = [t - T0, time.time() - T0]
import batchllm_cli.job, batchllm_cli.job_output, batchllm_cli.model_setup, batchllm_cli.planned_feed
import batchllm_cli.run_prepare

def wrap(owner, name, phase):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def timed(*a, **k):
        s = time.time()
        try:
            return fn(*a, **k)
        finally:
            marks[phase] = [s - T0, time.time() - T0]
    for mod in list(sys.modules.values()):  # every module that imported the function by name
        if getattr(mod, name, None) is fn and (mod.__name__ or "").startswith("batchllm_cli"):
            setattr(mod, name, timed)
    if isinstance(owner, type):
        setattr(owner, name, timed)

wrap(batchllm_cli.run_prepare, "prepare_run", "prepare_run")
wrap(batchllm_cli.model_setup, "check_model_files", "check_model_files")
wrap(batchllm_cli.run_prepare, "build_fingerprint", "fingerprint")
wrap(batchllm_cli.job, "_load_engine", "model_load")
wrap(batchllm_cli.planned_feed.PlannedFeed, "_produce", "plan_thread")
wrap(batchllm_cli.job, "_generate", "generate")
wrap(batchllm_cli.job_output, "write_final", "write_final")
wrap(batchllm_cli.job_output, "write_marker", "marker")
def save():  # an atexit handler: batchllm's exit (normal or fast) runs it once the command is done
    marks["exit"] = [time.time() - T0, time.time() - T0]
    open(os.environ["STARTUP_BENCH_MARKS"], "w").write(json.dumps(marks))
atexit.register(save)
sys.argv = ["batchllm", *sys.argv[1:]]
app.main()
"""


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.time()
    env = {**env, "STARTUP_BENCH_T0": repr(t)}
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.time() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def _job(work: Path, model_dir: Path, env: dict[str, str]) -> dict[str, float]:
    for p in work.glob("out.parquet*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    marks_file = work / "marks.json"
    run_args = ["run", "one.csv", "--template", "t.j2", "--output", "out.parquet", "--model", str(model_dir),
                "--max-tokens", "8"]
    total = _timed([sys.executable, "-c", _DRIVER, *run_args], {**env, "STARTUP_BENCH_MARKS": str(marks_file)}, work)
    marks = json.loads(marks_file.read_text())
    return {"total": total, **{k: b - a for k, (a, b) in marks.items() if k != "exit"}, "exit": total - marks["exit"][0]}


def one_round(work: Path, model_dir: Path, env: dict[str, str], baseline: Path | None) -> dict[str, dict[str, float]]:
    runs: dict[str, dict[str, float]] = {"run": _job(work, model_dir, env)}
    if baseline is not None:
        runs["baseline"] = _job(work, model_dir, {**env, "PYTHONPATH": str(baseline)})
    runs["help"] = {"total": _timed([sys.executable, "-m", "batchllm_cli", "--help"], env, work)}
    runs["import_torch"] = {"total": _timed([sys.executable, "-c", "import torch"], env, work)}
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline", help="a commit whose `run` is timed in the same rounds")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work = Path(tempfile.mkdtemp(prefix="batchllm-startup-"))
    try:
        model_dir = Path(subprocess.run(
            [sys.executable, "-c", "from pathlib import Path; import sys; from engine.demo_model import "
             "ensure_demo_model; print(ensure_demo_model(Path(sys.argv[1])))", str(work / "cache")],
            env=env, capture_output=True, text=True, check=True).stdout.strip())
        baseline = None
        if args.baseline:
            baseline = work / "baseline"
            baseline.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        (work / "one.csv").write_text("q\nhello world\n")
        (work / "t.j2").write_text("Say: {{ q }}\n")
        one_round(work, model_dir, env, baseline)  # warm-up, untimed: .pyc files, the page cache
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(work, model_dir, env, baseline))
            r = rounds[-1]
            print(f"round {i} " + " ".join(f"{v} {r[v]['total']:.2f}s" for v in r), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for variant in rounds[0]:
        phases = rounds[0][variant]
        summary[variant] = {
            ph: {"min": round(min(r[variant][ph] for r in rounds), 3),
                 "median": round(statistics.median(r[variant][ph] for r in rounds), 3)}
            for ph in phases
        }
    for variant, phases in summary.items():
        print(variant, file=sys.stderr)
        for ph, v in phases.items():
            print(f"  {ph:18s} min {v['min']:6.3f}s  median {v['median']:6.3f}s", file=sys.stderr)
    if not args.no_write:
        write_results(results_path("startup", "cpu"), {
            "bench": "startup",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "batchllm run one.csv --template t.j2 --output out.parquet --model <demo model> --max-tokens 8",
            "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                     "python": platform.python_version(),
                     "load_avg_at_end": os.getloadavg()},
            **git_commit("batchllm_cli", "engine", "kernels"),
            "rounds": args.rounds,
            "baseline_commit": None if args.baseline is None else subprocess.run(
                ["git", "rev-parse", args.baseline], cwd=REPO, capture_output=True, text=True).stdout.strip(),
            "seconds": summary,
            "phases_note": ("phases overlap: check_model_files and fingerprint are inside prepare_run; marker is inside "
                            "write_final; plan_thread runs while model_load does. interpreter = spawn to the "
                            "driver's first line; exit = the command done (atexit) to the process having exited."),
            "per_round": rounds,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
