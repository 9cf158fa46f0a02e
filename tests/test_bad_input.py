"""Bad input never crashes a run or loses a row: a clear error before the model loads, or an error row.

Every test checks the exit code, the message, and that each input row appears exactly once: in the
output (answered), in the errors file (OUTPUT.errors.jsonl, error rows) or in the rejects file
(OUTPUT.rejects.jsonl, malformed CSV lines skipped with --skip-bad-rows).
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reliability_utils import (
    FAST, assert_finished_cleanly, flat, invoke, one_error_line, read_jsonl, read_rows, snapshot, write_template,
)

@pytest.fixture(autouse=True)
def demo_cache(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))


def run(inp: Path, out: Path, tpl: Path, *extra: str):  # noqa: ANN201
    return invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, *extra])


def side(out: Path, kind: str) -> Path:
    return out.with_name(f"{out.name}.{kind}")


def assert_every_row_once(out: Path, ids: list, id_key: str = "id", position_ids: bool = False) -> None:
    """Answered rows (output, no error) + error rows (errors file) + rejected lines == the input ids."""
    rows = read_rows(out)
    answered = [r[id_key] for r in rows if r["response_error"] is None]
    errors = read_jsonl(side(out, "errors.jsonl"))
    in_error = [rows[e["row"]][id_key] if position_ids else e.get("id", rows[e["row"]][id_key]) for e in errors]
    assert all(rows[e["row"]]["response_error"] == e["error"] for e in errors)
    assert sorted(r[id_key] for r in rows if r["response_error"] is not None) == sorted(in_error)
    rejected = read_jsonl(side(out, "rejects.jsonl"))
    rejected_ids = [next(csv.reader(io.StringIO(r["csv_line"])))[0] for r in rejected]
    got = Counter(str(i) for i in answered + in_error + rejected_ids)
    assert got == Counter(str(i) for i in ids), (got, ids)


# ---- malformed CSV ---------------------------------------------------------------------------------
GOOD = "".join(f"{i},t{i},{i}\n" for i in range(1, 4))
MALFORMED = {
    "too_few_columns": ("id,text,n\n" + GOOD + "4,t4\n5,t5,5\n", 5, "Expected Number of Columns: 3 Found: 2"),
    "too_many_columns": ("id,text,n\n" + GOOD + "4,t4,4,x\n5,t5,5\n", 5, "Expected Number of Columns: 3 Found: 4"),
    "unterminated_quote": ('id,text,n\n' + GOOD + '4,"t4,4\n5,t5,5\n', 5, "unterminated quote"),
    "not_utf8": (b"id,text,n\n" + GOOD.encode() + b"4,caf\xe9,4\n5,t5,5\n", 5, "Invalid unicode"),
    # Past any sniffer's sample: the full read finds it, still before the model loads. (A value is
    # never "of the wrong type": CSV columns are text.)
    "late_unterminated_quote": ("id,text,n\n" + "".join(f"{i},t{i},{i}\n" for i in range(30000)) + '30000,"x,1\n',
                                30002, "unterminated quote"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_csv_fails_before_the_model_naming_the_line(tmp_path: Path, case: str, no_model: None) -> None:
    text, line, reason = MALFORMED[case]
    inp = tmp_path / "in.csv"
    inp.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out" / "o.parquet"
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ text }}"))
    assert result.exit_code == 2, result.output
    message = one_error_line(result.stderr)
    assert f"CSV Error on Line: {line}" in message and reason in message and "--skip-bad-rows" in message
    assert not out.parent.exists() or not list(out.parent.iterdir())  # nothing written


def test_skip_bad_rows_rejects_lines_and_every_record_is_accounted_for(tmp_path: Path) -> None:
    lines = ["id,text,n"] + [f"{i},t{i},{i}" for i in range(1, 21)]
    lines[5] = "5,t5"  # too few columns
    lines[9] = "9,t9,9,extra"  # too many
    data = "\n".join(lines).encode() + b"\n"
    data = data.replace(b"14,t14", b"14,t\xe914")  # not UTF-8
    inp = tmp_path / "in.csv"
    inp.write_bytes(data)
    records = list(csv.reader(io.StringIO(data.decode("latin-1"))))[1:]  # an independent count
    out = tmp_path / "o.jsonl"
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ text }}"), "--skip-bad-rows")
    assert result.exit_code == 3, result.output  # finished, but not every record was answered
    rejects = read_jsonl(side(out, "rejects.jsonl"))
    assert [(r["line"], r["error_type"]) for r in rejects] == [
        (6, "MISSING COLUMNS"), (10, "TOO MANY COLUMNS"), (15, "INVALID ENCODING")]
    assert "rejected: 3 malformed input records (exit 3)" in flat(result.stderr)
    rows = read_rows(out)
    assert len(rows) + len(rejects) == len(records) == 20
    assert_every_row_once(out, [r[0] for r in records])
    marker = assert_finished_cleanly(out, 17)
    assert marker["rows_rejected"] == 3 and marker["rejects_file"] == str(side(out, "rejects.jsonl"))


def test_skip_bad_rows_counts_every_record_an_unterminated_quote_swallowed(tmp_path: Path) -> None:
    # Records 2..5 disappear into one DuckDB reject (the quote never closes); each is a rejected record.
    data = 'id,text\n1,a\n2,"never closed\n3,c\n4,d\n5,e\n'
    inp = tmp_path / "in.csv"
    inp.write_text(data)
    before = snapshot(tmp_path)
    records = len(data.splitlines()) - 1  # independent count: one record per line, no quoted newlines
    out = tmp_path / "o.jsonl"
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ text }}"), "--skip-bad-rows")
    assert result.exit_code == 3, result.output
    assert "rejected: 4 malformed input records (exit 3)" in flat(result.stderr)
    rejects = read_jsonl(side(out, "rejects.jsonl"))
    assert [(r["line"], r["csv_line"]) for r in rejects] == [(3, '2,"never closed'), (4, "3,c"), (5, "4,d"), (6, "5,e")]
    marker = assert_finished_cleanly(out, 1)
    assert marker["rows_rejected"] == 4 and marker["rows"] + marker["rows_rejected"] == records == 5
    assert_every_row_once(out, ["1", "2", "3", "4", "5"])
    assert {k: v for k, v in snapshot(tmp_path).items() if k == "in.csv"} == {"in.csv": before["in.csv"]}


def test_skip_bad_rows_streams_the_rows_it_counted(tmp_path: Path) -> None:
    from batchllm_cli.table_io import TableSource

    inp = tmp_path / "in.csv"
    inp.write_text('id,text\n1,a\n2,"b"x\n3,c\n4,"d\n5,e\n')
    with TableSource(inp, skip_bad_rows=True) as src:
        accepted = src.validate()
        streamed = [r["id"] for b in src.batches(1) for r in b.to_pylist()]
        rejected = [r["line"] for r in src.rejects.to_pylist()]
    assert streamed == ["1", "3"] and accepted == 2
    assert rejected == [3, 5, 6] and accepted + len(rejected) == 5


@pytest.mark.parametrize("limit,exit_code", [("2", 2), ("3", 3), ("0", 2)])
def test_max_rejects_fails_before_the_model_when_exceeded(
    tmp_path: Path, limit: str, exit_code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text\n1,a\n2\n3,c\n4\n5\n6,f\n")  # three records with a missing column
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    before = snapshot(tmp_path)
    if exit_code == 2:
        import engine.llm_engine

        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("this must be decided before the model loads")

        monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", forbidden)
    out = tmp_path / "out" / "o.csv"
    result = run(inp, out, tpl, "--skip-bad-rows", "--max-rejects", limit)
    assert result.exit_code == exit_code, result.output
    if exit_code == 2:
        message = one_error_line(result.stderr)
        assert f"3 malformed records, more than --max-rejects {limit}" in message and "line 3" in message
        assert not out.parent.exists() or not list(out.parent.iterdir())
    else:
        assert [r["text"] for r in read_rows(out)] == ["a", "c", "f"]
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out")} == before


def test_skip_bad_rows_is_for_csv_only(tmp_path: Path, no_model: None) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a"}\n')
    result = run(inp, tmp_path / "o.parquet", write_template(tmp_path / "t.j2", "{{ text }}"), "--skip-bad-rows")
    assert result.exit_code == 2 and "CSV input only" in flat(result.stderr)


def test_malformed_json_line_fails_before_the_model(tmp_path: Path, no_model: None) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a"}\n{"text": "b\n{"text": "c"}\n')
    result = run(inp, tmp_path / "o.parquet", write_template(tmp_path / "t.j2", "{{ text }}"))
    assert result.exit_code == 2
    # DuckDB names the line where the broken string ends (the raw newline inside it).
    assert "Malformed JSON" in one_error_line(result.stderr) and "in line 3" in result.stderr


# ---- nulls -------------------------------------------------------------------------------------------
def test_null_in_a_template_variable_is_an_error_row(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text,note\n1,a,x\n2,,y\n3,c,\n4,d,z\n")  # empty fields are NULL ("" is text)
    tpl = write_template(tmp_path / "t.j2", "{{ text }} ({{ note | default('no note') }})")
    out = tmp_path / "o.parquet"
    result = run(inp, out, tpl)
    assert result.exit_code == 3, result.output
    assert "null value: column text is null" in flat(result.stderr)
    errors = read_jsonl(side(out, "errors.jsonl"))
    assert [(e["row"], e["error_type"]) for e in errors] == [(1, "null_value")]  # note: optional, default
    assert "--nulls empty" in errors[0]["error"]
    assert_every_row_once(out, [1, 2, 3, 4])
    assert assert_finished_cleanly(out, 4)["rows_failed"] == 1

    result = run(inp, out, tpl, "--nulls", "empty")
    assert result.exit_code == 0, result.output
    assert not side(out, "errors.jsonl").exists()  # the stale errors file of the previous job is gone
    assert read_rows(out)[1]["response_error"] is None


def test_null_in_json_input_with_id_column(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in [
        {"key": "a", "text": "x"}, {"key": "b", "text": None}, {"key": "c", "text": "z"}]))
    out = tmp_path / "o.csv"
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ text }}"), "--id-column", "key")
    assert result.exit_code == 3, result.output
    errors = read_jsonl(side(out, "errors.jsonl"))
    assert [(e["row"], e["id"], e["error_type"]) for e in errors] == [(1, "b", "null_value")]
    assert_every_row_once(out, ["a", "b", "c"], id_key="key")


# ---- prompt length -----------------------------------------------------------------------------------
def _prompt_tokens(demo_model_dir: Path, text: str) -> int:
    from engine.tokenizer import Tokenizer

    return len(Tokenizer(demo_model_dir).encode_batch(["Say: " + text])[0])


def test_prompt_longer_than_context_minus_max_tokens(tmp_path: Path, demo_model_dir: Path) -> None:
    fit = 2048 - 3  # the demo model's context minus --max-tokens 3
    base = _prompt_tokens(demo_model_dir, "")
    texts = ["short", "x" * (fit - base), "y" * (fit - base + 1), "z" * 5000]  # fits, fits exactly, +1, far
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": texts}), inp)
    tpl = write_template(tmp_path / "t.j2", "Say: {{ text }}")
    out = tmp_path / "o.parquet"
    result = run(inp, out, tpl)
    assert result.exit_code == 3, result.output
    rows = read_rows(out)
    assert rows[1]["response_error"] is None and rows[1]["response_prompt_tokens"] == fit
    errors = read_jsonl(side(out, "errors.jsonl"))
    assert [(e["row"], e["error_type"]) for e in errors] == [(2, "prompt_too_long"), (3, "prompt_too_long")]
    assert f"prompt too long: {fit + 1} tokens, but at most {fit} fit" in errors[0]["error"]
    assert "--truncate" in errors[0]["error"]
    assert_every_row_once(out, [1, 2, 3, 4])

    for side_ in ("left", "right"):
        result = run(inp, out, tpl, "--truncate", side_)
        assert result.exit_code == 0, result.output
        assert "truncated: 2 prompts" in result.stderr
        rows = read_rows(out)
        assert [r["response_prompt_tokens"] for r in rows[1:]] == [fit, fit, fit]
        assert all(r["response_error"] is None for r in rows)


# ---- empty input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content", [("empty.csv", ""), ("blank.jsonl", "\n \n"), ("header.csv", "id,text\n"),
                                          ("array.json", "[ ]\n")])  # a JSON writer's "no rows"
def test_empty_and_header_only_input_give_an_empty_typed_output(
    tmp_path: Path, name: str, content: str, no_model: None
) -> None:
    inp = tmp_path / name
    inp.write_text(content)
    out = tmp_path / "o.parquet"
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ text }}"))
    assert result.exit_code == 0, result.output
    schema = pq.read_schema(out)
    assert pq.read_table(out).num_rows == 0
    expected_input = ["id", "text"] if name == "header.csv" else []
    assert schema.names == expected_input + [
        "response", "response_finish_reason", "response_prompt_tokens", "response_completion_tokens",
        "response_error"]
    assert schema.field("response").type == pa.string() and schema.field("response_prompt_tokens").type == pa.int64()
    assert_finished_cleanly(out, 0)


# ---- output path ----------------------------------------------------------------------------------
def test_output_directory_or_input_is_refused_before_the_model(tmp_path: Path, no_model: None) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text\n1,a\n")
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    (tmp_path / "d.parquet").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(inp, tmp_path / "d.parquet", tpl)
    assert result.exit_code == 2 and "is a directory" in one_error_line(result.stderr)
    result = run(inp, inp, tpl)
    assert result.exit_code == 2 and "is the input file" in one_error_line(result.stderr)
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "o.parquet"), "--checkpoint-dir", str(inp)])
    assert result.exit_code == 2 and "--checkpoint-dir" in one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_row_whose_template_raises_is_an_error_row(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,n\n1,1\n2,0\n3,5\n")
    out = tmp_path / "o.parquet"
    # CSV values are text: a template that wants a number says so.
    result = run(inp, out, write_template(tmp_path / "t.j2", "{{ 10 // (n | int) }}"))
    assert result.exit_code == 3, result.output
    errors = read_jsonl(side(out, "errors.jsonl"))
    assert [(e["row"], e["error_type"]) for e in errors] == [(1, "template_error")]
    assert "template error" in errors[0]["error"] and "division" in errors[0]["error"]
    assert_every_row_once(out, [1, 2, 3])
