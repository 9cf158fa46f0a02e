"""`--ignore-eos`: rows run to --max-tokens past the model's end-of-text token (benchmarks need equal
output lengths); without it the same row stops there. On a copy of the demo model whose EOS ids are
extended by a token that the model really generates early for one prompt."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from reliability_utils import FAST, invoke, read_rows, write_rows_csv, write_template

ROWS, MAX_TOKENS = 6, 8


def _model_with_early_eos(demo_model_dir: Path, dst: Path, prompt: str) -> tuple[Path, int]:
    """A copy of the demo model where the 2nd token it generates greedily for `prompt` counts as EOS."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    shutil.copytree(demo_model_dir, dst)
    engine = LLMEngine(EngineConfig(model_dir=str(dst), device="cpu", dtype="float32", kv_cache_memory=16 << 20))
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    (result,) = engine.generate([("row", ids, params)])
    eos = result.token_ids[1]
    assert result.token_ids[0] != eos  # so the row stops at its 2nd token, not its 1st
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], eos] if isinstance(gen["eos_token_id"], int) else [*gen["eos_token_id"], eos]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst, eos


def test_ignore_eos_runs_every_row_to_max_tokens(tmp_path: Path, demo_model_dir: Path) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", ROWS)
    tpl = write_template(tmp_path / "t.j2")
    model, _ = _model_with_early_eos(demo_model_dir, tmp_path / "model", "Say: r0 a")  # row 0's prompt

    def run(out: Path, *extra: str) -> list[dict]:
        args = ["run", str(inp), "-t", str(tpl), "-o", str(out), "--model", str(model), *FAST,
                "--max-tokens", str(MAX_TOKENS), *extra]
        result = invoke(args)
        assert result.exit_code == 0, result.output
        return sorted(read_rows(out), key=lambda r: r["id"])

    stopped = run(tmp_path / "plain.parquet")
    assert stopped[0]["response_finish_reason"] == "stop"
    assert stopped[0]["response_completion_tokens"] == 2  # the EOS token is counted, not shown

    for mode in ("plan", "none"):
        full = run(tmp_path / f"ignore-{mode}.parquet", "--ignore-eos", "--prefix-sharing", mode)
        assert [r["response_completion_tokens"] for r in full] == [MAX_TOKENS] * ROWS
        assert {r["response_finish_reason"] for r in full} == {"length"}
        # the answer up to the early EOS is the same text; it just goes on
        assert len(full[0]["response"]) > len(stopped[0]["response"])
        assert full[0]["response"].startswith(stopped[0]["response"])


def test_ignore_eos_keeps_stop_strings(tmp_path: Path, demo_model_dir: Path) -> None:
    """--stop still ends a row under --ignore-eos (as in vLLM): only the EOS token is ignored."""
    inp = write_rows_csv(tmp_path / "in.csv", 1)
    tpl = write_template(tmp_path / "t.j2")
    free = tmp_path / "free.parquet"
    base = ["run", str(inp), "-t", str(tpl), "--model", str(demo_model_dir), *FAST, "--max-tokens", str(MAX_TOKENS),
            "--ignore-eos"]
    assert invoke([*base, "-o", str(free)]).exit_code == 0
    text = read_rows(free)[0]["response"]
    stop = text[len(text) // 2:][:1]
    assert stop
    cut = tmp_path / "cut.parquet"
    result = invoke([*base, "-o", str(cut), "--stop", stop])
    assert result.exit_code == 0, result.output
    row = read_rows(cut)[0]
    assert row["response_finish_reason"] == "stop" and row["response"] == text[: text.index(stop)]
