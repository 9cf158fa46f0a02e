"""Token counts when rows end in error inside the engine: a row the engine refused before computing
any of it (prompt too long for the context, a token past the vocabulary) adds no prompt tokens; a row
it computed and then failed (NaN scores) does, so the attempt's token identity holds
(prefill = prompt - reused + shared prefixes + recomputed) and nothing is counted as recomputed."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

import model_factory
from reliability_utils import invoke, write_template


def test_token_counts_add_up_when_rows_fail_after_being_computed(
    tmp_path: Path, tiny_model_dir: Callable[[str], Path],
) -> None:
    """float16 overflows in MLPs scaled up 30x: some rows' scores turn NaN (error rows, exit 3). Their
    prompts were computed: they count as prompt tokens, and nothing counts as recomputed."""
    model = shutil.copytree(tiny_model_dir("llama_gqa"), tmp_path / "model")
    for path in model.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: v * 30 if "mlp" in k and ("down" in k or "up" in k) else v for k, v in tensors.items()},
                  path, metadata={"format": "pt"})
    inp = tmp_path / "rows.csv"
    with inp.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], *([t] for t in model_factory.corpus(20))])
    tpl = write_template(tmp_path / "t.j2")
    for sharing in ("plan", "none"):
        out = tmp_path / f"{sharing}.jsonl"
        result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), "--model", str(model), "-q",
                         "--dtype", "float16", "--max-tokens", "12", "--kv-cache-memory", "16MiB",
                         "--prefix-sharing", sharing, "--summary", "-"])
        assert result.exit_code == 3, result.output
        summary = json.loads(result.stdout.splitlines()[-1])
        att, job = summary["attempt"], summary["job"]
        assert att["rows_failed"] > 0 and "NaN" in json.dumps(summary["first_errors"])
        assert att["recomputed_tokens"] == 0 and att["preemptions"] == 0
        assert att["prompt_tokens"] == job["prompt_tokens"] >= att["prefix_hit_tokens"]
        assert att["prefill_tokens"] == att["prompt_tokens"] - att["prefix_hit_tokens"] + att["shared_prefix_tokens"]


def test_only_rows_the_engine_refused_before_computing_are_marked_refused(demo_model_dir: Path) -> None:
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model_dir=str(demo_model_dir), device="cpu", kv_cache_tokens=256))
    too_long = [5] * engine.max_model_len
    results = {r.key: r for r in engine.generate([("long", too_long, SamplingParams(max_tokens=2)),
                                                   ("ok", [5, 6, 7], SamplingParams(max_tokens=2))])}
    assert (results["long"].finish_reason, results["long"].refused) == ("error", True)
    assert (results["ok"].finish_reason != "error", results["ok"].refused) == (True, False)
