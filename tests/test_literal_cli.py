"""Issue 10, items 4, 5, 7, 14 through `batchllm run` with the demo model: pattern characters in the
input, output and run-directory paths reach no other file, and input values come back verbatim."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from reliability_utils import FAST, assert_finished_cleanly, invoke, read_rows, snapshot, write_template


@pytest.fixture(autouse=True)
def demo_cache(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_pattern_paths_read_and_write_only_their_own_files(tmp_path: Path) -> None:
    tpl = write_template(tmp_path / "t.j2", "Say: {{ text }}")
    # Another job, finished with its checkpoint kept: its run directory `o1.jsonl.batchllm` is what
    # `o[12].jsonl.batchllm` globs to.
    other_in = tmp_path / "g1.csv"  # also the decoy `g[1].csv` globs to
    other_in.write_text("zip,text\n99999,decoy one\n88888,decoy two\n77777,decoy three\n")
    other_out = tmp_path / "o1.jsonl"
    result = invoke(["run", str(other_in), "-t", str(tpl), "-o", str(other_out), "--keep-checkpoints", *FAST])
    assert result.exit_code == 0, result.output
    inp = tmp_path / "g[1].csv"
    inp.write_text("zip,text\n00501,one\n01234,two\n")
    before = snapshot(tmp_path)

    out = tmp_path / "o[12].jsonl"
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), "--keep-checkpoints", *FAST])
    assert result.exit_code == 0, result.output
    rows = strict_json_lines(out)
    assert [(r["zip"], r["text"]) for r in rows] == [("00501", "one"), ("01234", "two")]
    assert all(r["response_error"] is None and r["response"] is not None for r in rows)
    assert_finished_cleanly(out, 2, keep_checkpoints=True)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file intact

    # `~`, braces, quotes, spaces and a leading dash, CSV output: the same, verbatim.
    star = tmp_path / "-~{a,b} 'q\" *.csv"
    star.write_text('zip,text\n00501,""\n1.50,\n')
    out2 = tmp_path / "~" / "r [x]*.csv"
    result = invoke(["run", str(star), "-t", str(tpl), "-o", str(out2), "--nulls", "empty", *FAST])
    assert result.exit_code == 0, result.output
    with out2.open(newline="") as f:
        got = list(csv.reader(f))
    assert [r[:2] for r in got] == [["zip", "text"], ["00501", ""], ["1.50", ""]]
    assert out2.read_text().splitlines()[1].startswith('00501,"",')  # "" stays empty text ...
    assert out2.read_text().splitlines()[2].startswith("1.50,,")  # ... and a NULL stays NULL
    assert [r["text"] for r in read_rows(out2)] == ["", None]
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
