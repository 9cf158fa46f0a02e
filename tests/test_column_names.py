"""Column names compared the way DuckDB compares them (ASCII case ignored): a name that collides with an
answer column, the internal row id or another input column is refused before the model loads; every
other name comes back unchanged, with its values."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchllm_cli.collector import OutputColumns
from batchllm_cli.column_names import duckdb_key
from batchllm_cli.table_io import ROW_ID
from reliability_utils import FAST, flat, invoke, one_error_line, read_rows, snapshot, write_template

ANSWER_COLUMNS = ["response", "response_finish_reason", "response_prompt_tokens", "response_completion_tokens", "response_error"]


@pytest.fixture(autouse=True)
def demo_cache(env: dict[str, str]) -> None:
    """Every test here may run the demo model (found through BATCHLLM_CACHE_DIR)."""


def write_input(path: Path, names: list[str]) -> Path:
    """Two rows; column i holds the text `v{i}-{row}` (in the file's own format, names as given)."""
    rows = [[f"v{i}-{r}" for i in range(len(names))] for r in range(2)]
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([names, *rows])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(names, row))) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.table([pa.array([row[i] for row in rows]) for i in range(len(names))], names=names), path)
    return path


def run(inp: Path, out: Path, tpl: Path, *extra: str):  # noqa: ANN201
    return invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST, *extra])


@pytest.mark.parametrize(
    ("names", "culprit"),
    [
        (["id", "RESPONSE"], "'response'"),
        (["id", "Response_Error"], "'response_error'"),
        (["id", "response_FINISH_reason"], "'response_finish_reason'"),
    ],
)
def test_input_column_colliding_with_an_answer_column_is_refused_naming_column(
    tmp_path: Path, names: list[str], culprit: str
) -> None:
    inp = write_input(tmp_path / "in.csv", names)
    tpl = write_template(tmp_path / "t.j2", "Say: {{ id }}")
    before = snapshot(tmp_path)
    result = run(inp, tmp_path / "o.csv", tpl)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert culprit in line and "--column" in line and repr(names[1]) in line
    assert snapshot(tmp_path) == before  # nothing written: no output, no run directory, no marker
    # The fix the message names works, and the input column comes back under its own name.
    out = tmp_path / "o.csv"
    result = run(inp, out, tpl, "--column", "answer")
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert list(rows[0]) == names + [c.replace("response", "answer") for c in ANSWER_COLUMNS]
    assert [r[names[1]] for r in rows] == ["v1-0", "v1-1"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("names", [["Text", "text"], ["a", "a"], ["id", ROW_ID.upper()], ["id", ROW_ID]])
def test_input_columns_duckdb_cannot_tell_apart_are_refused(tmp_path: Path, suffix: str, names: list[str]) -> None:
    if suffix == ".jsonl" and names[0] == names[1]:
        pytest.skip("a JSON object cannot hold one key twice")
    inp = write_input(tmp_path / f"in{suffix}", names)
    tpl = write_template(tmp_path / "t.j2", "Say hi")
    before = snapshot(tmp_path)
    for args in (["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "o.csv"), *FAST], ["analyze", str(inp), "-t", str(tpl)]):
        result = invoke(args)
        assert result.exit_code == 2, result.output
        line = one_error_line(result.stderr)
        assert repr(names[1]) in line
    assert snapshot(tmp_path) == before


def struct(*names: str) -> pa.StructType:
    return pa.struct([(n, pa.int64()) for n in names])


@pytest.mark.parametrize(("column", "message"), [
    (pa.array([{"a": 1, "A": 2}], struct("a", "A")), "'a' and 'A' of input column st in"),
    (pa.array([[{"x": 1, "X": 2}]], pa.list_(struct("x", "X"))), "'x' and 'X' of input column st[] in"),
    (pa.array([[("k", {"b": 1, "B": 2})]], pa.map_(pa.string(), struct("b", "B"))),
     "'b' and 'B' of input column st[value] in"),
    (pa.array([{"in": {"c": 1, "C": 2}}], pa.struct([("in", struct("c", "C"))])), "'c' and 'C' of input column st.in in"),
    (pa.StructArray.from_arrays([pa.array([1]), pa.array([2])], names=["d", "d"]), "'d' and 'd' of input column st in"),
])
def test_nested_fields_duckdb_cannot_tell_apart_are_refused_naming_the_path(
    tmp_path: Path, column: pa.Array, message: str
) -> None:
    """DuckDB renamed the second field (`{"a":1,"A_1":2}` in every output, and `st.A` failed in a template)."""
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["x"], "st": column}), inp)
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    before = snapshot(tmp_path)
    for args in (["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "o.jsonl"), *FAST], ["analyze", str(inp), "-t", str(tpl)]):
        result = invoke(args)
        assert result.exit_code == 2, result.output
        line = one_error_line(result.stderr)
        assert f"The fields {message}" in line and "rename one of them in the input" in line, line
    assert snapshot(tmp_path) == before


def test_nested_json_keys_duckdb_cannot_tell_apart_are_refused_in_batchllm_terms(tmp_path: Path) -> None:
    """DuckDB's message suggested `ignore_errors=true`, an option batchllm does not take."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "x", "st": {"a": 1}}\n{"text": "y", "st": {"A": 2}}\n', encoding="utf-8")
    result = run(inp, tmp_path / "o.jsonl", write_template(tmp_path / "t.j2", "{{ text }}"))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "the key 'A' and another that differs from it only in upper/lower case" in line, line
    assert "ignore_errors" not in line and line.endswith("rename one of them in the input.")


def test_column_naming_the_row_id_is_refused(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.csv", ["id"])
    result = run(inp, tmp_path / "o.csv", write_template(tmp_path / "t.j2", "hi"), "--column", ROW_ID.upper())
    assert result.exit_code == 2
    assert "internal row id" in one_error_line(result.stderr) and "--column" in flat(result.stderr)


def test_a_json_columns_position_is_its_place_in_the_file(tmp_path: Path) -> None:
    # JSON keys were listed with SELECT DISTINCT, in its hash table's order: the empty name at position
    # 1 was once reported as "column 2" (a flaky CI run); with 40 keys the order is scrambled every time.
    names = [f"k{i:02d}" for i in range(40)]
    names[29] = ""
    inp = write_input(tmp_path / "in.jsonl", names)
    result = run(inp, tmp_path / "o.csv", write_template(tmp_path / "t.j2", "{{ k00 }}"))
    assert result.exit_code == 2, result.output
    assert "Input column 30 has no name" in one_error_line(result.stderr)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_column_without_a_name_is_refused(tmp_path: Path, suffix: str) -> None:
    """pandas' to_csv() writes its index under an empty name, which DuckDB reads back as `column0`."""
    inp = write_input(tmp_path / f"in{suffix}", ["", "text"])
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    before = snapshot(tmp_path)
    result = run(inp, tmp_path / "o.csv", tpl)
    assert result.exit_code == 2, result.output
    assert "Input column 1 has no name" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_non_ascii_case_variants_are_distinct_columns_as_in_duckdb(tmp_path: Path) -> None:
    names = ["É", "é", "Ω", "ω", "RESPONSE\u0130"]  # DuckDB folds ASCII only: these are five columns
    inp = write_input(tmp_path / "in.parquet", names)
    out = tmp_path / "o.parquet"
    result = run(inp, out, write_template(tmp_path / "t.j2", "hi"))
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == names + ANSWER_COLUMNS
    assert table.select(names).to_pylist() == pq.read_table(inp).to_pylist()


# ---- property: random names -> a clean refusal or an exact round trip ----------------------------
_SPECIAL = [
    "response", "RESPONSE", "Response_Error", "response_prompt_tokens", ROW_ID, ROW_ID.upper(), "__batchllm_Row_Id",
    "range", "dict", "cycler", "joiner", "namespace", "lipsum", "loop", "self",
    "select", "FROM", "order", "group", "where", "null", "true", "rowid", "*", "1", "",
    "a b", 'quo"te', "quo'te", "semi;colon", "back\\slash", "tab\there", "new\nline", "ü", "Ü", "ß", "SS", "日本",
    "\u212a", "k", "K", "text", "Text", "TEXT", "text_1",
]
_NAME = st.one_of(st.sampled_from(_SPECIAL), st.text(min_size=1, max_size=8))


def _expect_refusal(names: list[str], prefix: str) -> bool:
    keys = [duckdb_key(n) for n in names]
    reserved = {duckdb_key(n) for n in OutputColumns(prefix).names + [ROW_ID]}
    has_nul = any("\x00" in n or n == "" for n in names)  # DuckDB cuts a name at NUL: refused, never renamed
    return has_nul or len(set(keys)) < len(keys) or bool(reserved & set(keys))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(_NAME, min_size=1, max_size=4).filter(lambda ns: all(ns)),
    prefix=st.sampled_from(["response", "response", "Text", "select", "ü"]),
)
@example(names=["\x00"], prefix="response")
@example(names=["a\x00b", "c"], prefix="response")
def test_random_column_names_are_refused_cleanly_or_round_trip_exactly(names: list[str], prefix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        inp = write_input(tmp_path / "in.parquet", names)
        out = tmp_path / "o.parquet"
        result = run(inp, out, write_template(tmp_path / "t.j2", "Say hi"), "--column", prefix)
        if _expect_refusal(names, prefix):
            assert result.exit_code == 2, result.output
            one_error_line(result.stderr)
            assert not out.exists()
            return
        assert result.exit_code == 0, result.output
        table = pq.read_table(out)
        assert table.column_names == names + OutputColumns(prefix).names
        assert table.select(list(range(len(names)))).to_pylist() == pq.read_table(inp).to_pylist()
        assert table.column(OutputColumns(prefix).error).null_count == 2
