"""Which files of a model directory count, and what their odd contents do to a run: a token the
tokenizer adds past the model's vocabulary fails its rows only; stale or foreign safetensors files
beside the weights never override them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reliability_utils import FAST, invoke, read_jsonl, read_rows, write_template


@pytest.fixture
def model(tmp_path: Path, demo_model_dir: Path) -> Path:
    """A private copy of the demo model."""
    return Path(shutil.copytree(demo_model_dir, tmp_path / "model"))


def _write_csv(path: Path, texts: list[str]) -> Path:
    path.write_text("id,text\n" + "".join(f"{i},{text}\n" for i, text in enumerate(texts, 1)), encoding="utf-8")
    return path


def test_token_past_the_model_vocabulary_fails_its_row_only(model: Path, tmp_path: Path) -> None:
    # A pad_token missing from tokenizer.json's vocabulary is added by the tokenizer after its last
    # token: id == config.json's vocab_size, one past the embedding's last row.
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "[PAD]"
    config_path.write_text(json.dumps(config))
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    inp = _write_csv(tmp_path / "in.csv", ["hello there", "fill [PAD] here", "ok"])
    out = tmp_path / "out.csv"
    args = ["run", str(inp), "-t", str(write_template(tmp_path / "t.j2", "{{ text }}")), "-o", str(out),
            "--model", str(model), *FAST]
    result = invoke(args)
    assert result.exit_code == 3, result.output
    # said once before any row runs
    assert f"1 token(s) past the model's vocabulary of {vocab_size} (config.json vocab_size), e.g. '[PAD]'" in result.stderr
    rows = read_rows(out)
    assert [row["response_finish_reason"] for row in rows] == ["length", "error", "length"]
    error = rows[1]["response_error"]
    assert f"token id {vocab_size} ('[PAD]'), past the model's vocabulary of {vocab_size}" in error
    assert "fix the tokenizer files" in error
    assert [e["row"] for e in read_jsonl(out.with_name(out.name + ".errors.jsonl"))] == [1]
