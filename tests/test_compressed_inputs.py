"""Damaged gzip input is one error line and exit 2, before the model loads, for run and analyze.

A truncated .csv.gz (or .jsonl.gz small enough for Python to read it first) used to end with click's bare
"Aborted!" and exit 1 (gzip's EOFError), and a file named .gz that is not gzip with a traceback
(BadGzipFile), wherever Python read it: the blank-file check, the CSV sniffer, the record checks, the
stdin spool, the --encoding transcoding.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reliability_utils import one_error_line

runner = CliRunner()
TRUNCATED = "(the gzip stream ends early: the file is truncated)"
NOT_GZIP = "(its name ends in .gz but it is not gzip data)"


@pytest.fixture(autouse=True)
def demo_cache(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))  # analyze counts with its tokenizer


def invoke(command: str, inp: Path | str, tmp_path: Path, *extra: str, stdin: bytes | None = None):  # noqa: ANN201
    from batchllm_cli.app import app

    tpl = tmp_path / "t.j2"
    tpl.write_text("Say: {{ text }}", encoding="utf-8")
    out = ["-o", str(tmp_path / "out.parquet")] if command == "run" else []
    return runner.invoke(app, [command, str(inp), "-t", str(tpl), *out, *extra], input=stdin)


def csv_text(rows: int) -> bytes:
    return ("id,text\n" + "".join(f"{i},some text number {i}\n" for i in range(rows))).encode()


def jsonl_text(rows: int) -> bytes:
    return "".join(json.dumps({"id": i, "text": f"some text number {i}"}) + "\n" for i in range(rows)).encode()


def truncated(data: bytes, keep: int) -> bytes:
    """The first `keep` bytes of `data` gzipped uncompressed (level 0), so `keep` is about the text kept."""
    whole = gzip.compress(data, compresslevel=0)
    assert len(whole) > keep
    return whole[:keep]


@pytest.mark.parametrize("command", ["run", "analyze"])
@pytest.mark.parametrize("name, data, keep", [
    ("small.csv.gz", csv_text(200), 3000),  # ends inside the first 4 KiB (the blank-file check)
    ("head.csv.gz", csv_text(2000), 20_000),  # ends inside the sniffer's first megabyte
    ("long.csv.gz", csv_text(80_000), 1_500_000),  # ends after it: DuckDB's read, then the line-end check
    ("small.jsonl.gz", jsonl_text(200), 3000),
], ids=["small.csv.gz", "head.csv.gz", "long.csv.gz", "small.jsonl.gz"])
def test_a_truncated_gzip_file_is_one_line_naming_it(tmp_path: Path, no_model: None, command: str,
                                                      name: str, data: bytes, keep: int) -> None:
    inp = tmp_path / name
    inp.write_bytes(truncated(data, keep))
    result = invoke(command, inp, tmp_path)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: Cannot read {inp}: ") and TRUNCATED in line
    assert not (tmp_path / "out.parquet").exists()


def test_truncated_gzip_on_stdin_and_through_encoding(tmp_path: Path, no_model: None) -> None:
    data = truncated(csv_text(2000), 20_000)
    piped = invoke("run", "-", tmp_path, stdin=truncated(csv_text(200), 3000))
    assert piped.exit_code == 2 and TRUNCATED in one_error_line(piped.stderr)
    inp = tmp_path / "in.csv.gz"
    inp.write_bytes(data)
    transcoded = invoke("run", inp, tmp_path, "--encoding", "cp1252")
    assert transcoded.exit_code == 2 and TRUNCATED in one_error_line(transcoded.stderr)


@pytest.mark.parametrize("command", ["run", "analyze"])
@pytest.mark.parametrize("name, data", [("plain.csv.gz", csv_text(2)), ("plain.jsonl.gz", jsonl_text(2))],
                         ids=["csv", "jsonl"])
def test_a_gz_file_that_is_not_gzip_is_one_line_with_the_fix(tmp_path: Path, no_model: None, command: str,
                                                               name: str, data: bytes) -> None:
    inp = tmp_path / name
    inp.write_bytes(data)
    result = invoke(command, inp, tmp_path)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: Cannot read {inp}: Not a gzipped file") and NOT_GZIP in line
    assert "rename it without .gz" in line
