"""bench/e2e_paper.py --cpu-smoke runs end to end and its JSON says what the GPU run relies on.

The smoke workload has no memory pressure, so `plan` must compute exactly the trie's tokens, and
under greedy decoding every engine mode must produce the same tokens. No timing is asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENGINE_MODES = ("plan", "none", "lru")


@pytest.mark.slow
def test_e2e_paper_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_paper.py"), "--cpu-smoke", "--breakdown-rows", "4",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results, workload = report["results"], report["workload"]

    assert set(results) == {*ENGINE_MODES, "transformers"}
    unique = workload["unique_prompt_tokens"]
    assert unique == workload["groups"] * workload["prefix"] + workload["rows"] * workload["suffix"]
    plan = results["plan"]
    assert plan["stats"]["preemptions"] == 0 and plan["stats"]["sharing_fallbacks"] == 0
    assert plan["prefill_tokens"] == unique == plan["stats"]["unique_prompt_tokens"]
    assert plan["prefill_tokens"] < results["none"]["prefill_tokens"]
    assert results["none"]["prefill_tokens"] == workload["prompt_tokens"]

    # greedy: every engine mode yields the same tokens, exactly `output` per row
    assert report["checks"]["outputs_identical"] is True
    assert len({results[m]["outputs_sha256"] for m in ENGINE_MODES}) == 1
    for mode in ENGINE_MODES:
        r = results[mode]
        assert r["rows"] == workload["rows"] and r["rows_identical_to_plan"] == 1.0 == r["first_token_same_as_plan"]
        assert r["output_tokens"] == workload["rows"] * workload["output"] and r["exact_output_tokens"]
        assert r["stats"]["completion_tokens"] == r["output_tokens"]  # warm-up subtracted
        assert r["roofline_fraction"] > 0
        # --breakdown-rows: every step of the 4-row re-run timed once, and the profiled run's ops
        b = r["breakdown"]
        assert b["rows"] == 4 and sum(k["steps"] for k in b["steps"].values()) >= workload["output"]
        assert b["profile"]["device_time_s"] > 0 and any(
            "mm" in k["name"] or "linear" in k["name"] for k in b["profile"]["kernels"])
    hf = results["transformers"]
    assert hf["output_tokens"] == hf["rows"] * workload["output"] and hf["roofline_fraction"] is None

    roof = report["roofline"]
    assert roof["unique_prompt_tokens"] == unique
    assert roof["prefill_flops"] > 0 and roof["decode_bytes"] >= roof["decode_bytes_single_batch"] > 0
    assert roof["roofline_s"] == pytest.approx(roof["prefill_s"] + roof["decode_s"])
    assert report["rates"]["matmul_TFLOPs"] > 0 and report["rates"]["copy_GBps"] > 0
    assert {"plan/none", "plan/lru", "plan/transformers"} <= set(report["speedups"])
    assert report["git"]["commit"] and "--cpu-smoke" in report["command"]
