"""bench/vs_vllm.py's batchllm worker (no vLLM needed): it starts in its own process, runs a tiny
job cold each round and reports what the side-by-side table is built from."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _vs_vllm():
    """bench/vs_vllm.py as a module (bench/ is not a package)."""
    if "vs_vllm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vs_vllm", REPO / "bench" / "vs_vllm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vs_vllm"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["vs_vllm"]


@pytest.mark.parametrize("mode", ["plan", "lru"])
def test_batchllm_worker_runs_a_tiny_job(mode: str, demo_model_dir: Path, tmp_path: Path) -> None:
    vs = _vs_vllm()
    shared = [256] + list(range(40, 100))  # BOS + a 60-token shared prefix
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + [[256, 7, 8, 9]]
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    warm = tmp_path / "warm.json"
    warm.write_text(json.dumps(prompts[:2]))
    kv_tokens = 4096
    spec = {"engine": "batchllm", "model_dir": str(demo_model_dir), "kv_tokens": kv_tokens,
            "kv_bytes": kv_tokens * vs.kv_bytes_per_token(demo_model_dir), "block_size": 16,
            "max_batch_tokens": None, "mode": mode, "prefix_caching": None, "threads": None,
            "warmup_file": str(warm)}
    setting = vs.Setting(f"batchllm-{mode}", "batchllm", mode=mode)
    worker = vs.Worker(setting, sys.executable, spec, tmp_path, tmp_path / "worker.log")
    try:
        assert worker.ready["ready"] is True and worker.ready["startup_s"] > 0
        assert worker.ready["block_size"] == 16 and worker.ready["torch_threads"] >= 1
        rounds = [worker.run(prompts_file, 5, tmp_path / f"out{r}.json") for r in range(2)]
    finally:
        worker.close()
    assert worker.proc.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]

    n = sum(map(len, prompts))
    for answer in rounds:
        assert answer["rows"] == len(prompts) and answer["output_tokens"] == 5 * len(prompts)
        assert answer["prompt_tokens"] == n and answer["engine_s"] > 0
        assert answer["kv_capacity_tokens"] == kv_tokens
        # plan computes exactly the token trie; lru computes what its cache did not hold (rows
        # admitted in one step find nothing cached yet)
        unique = vs.unique_prompt_tokens(prompts)
        if mode == "plan":
            assert answer["prefill_tokens"] == unique and answer["cache_hit_tokens"] >= 6 * 60
        else:
            assert answer["prefill_tokens"] + answer["cache_hit_tokens"] == n
            assert answer["prefill_tokens"] >= unique
    # every round starts cold: the second one finds nothing cached by the first
    assert rounds[0]["prefill_tokens"] == rounds[1]["prefill_tokens"]
    outputs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert outputs[0] == outputs[1] and all(len(o) == 5 for o in outputs[0])  # greedy, EOS ignored

    for answer in rounds:
        answer["loadavg_1m"] = 0.0
    summary = vs.summarize(rounds, worker.ready, outputs[0], 5)
    assert summary["exact_output_tokens"] and summary["same_counts_every_round"]
    assert summary["engine_s_min"] <= summary["engine_s_median"]
    assert summary["wall_s"] >= summary["startup_s"]


def test_unique_prompt_tokens_is_the_trie_size() -> None:
    vs = _vs_vllm()
    assert vs.unique_prompt_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [6]]) == 3 + 1 + 1 + 1
    assert vs.unique_prompt_tokens([[1, 2], [1, 2]]) == 2


def test_wait_until_quiet_is_bounded_and_samples_two_windows() -> None:
    """The harness waits before each timed run, but never past its limit, and never less than two
    sampling windows (a busy machine must not stall the benchmark; an idle one is still checked)."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("the quiet wait reads Linux's /proc/stat")
    vs = _vs_vllm()
    waited = vs.wait_until_quiet(limit_s=0.6)
    assert 2 * vs.QUIET_WINDOW_S - 0.05 <= waited <= 0.6 + vs.QUIET_WINDOW_S + 0.5


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_paused_worker_stops_its_whole_process_tree_until_resumed(tmp_path: Path) -> None:
    """While one setting is timed the others' workers are stopped, child processes included (vLLM's engine
    runs in a child of its worker: stopping the worker alone would leave it polling beside the timed run)."""
    if not os.path.isdir("/proc"):
        pytest.skip("the harness finds a worker's processes in Linux's /proc")
    import subprocess
    import time

    vs = _vs_vllm()
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")])
    worker = object.__new__(vs.Worker)  # the process handling only: no engine behind it
    worker.proc = parent
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert set(worker.processes()) == {parent.pid, child}
        worker.pause()
        time.sleep(0.2)
        assert _state(parent.pid) == "T" and _state(child) == "T"
        worker.resume()
        time.sleep(0.2)
        assert _state(parent.pid) != "T" and _state(child) != "T"
    finally:
        worker.resume()
        written = pid_file.read_text() if pid_file.exists() else ""
        for pid in [parent.pid] + ([int(written)] if written else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait()
