"""Table reading/writing through DuckDB: formats, row order, round trips, atomic output. No model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm_cli.errors import InputError, UsageError
from batchllm_cli.table_io import ROW_ID, TableSource, check_output_path, read_table, write_output

TRICKY_ROWS = [
    {"id": 1, "text": "plain"},
    {"id": 2, "text": "has, a comma"},
    {"id": 3, "text": "two\nlines, and a comma"},
    {"id": 4, "text": 'a "quoted" word'},
    {"id": 5, "text": "unicode: é ü 完璧 😀"},
    {"id": 6, "text": ""},
]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def all_rows(source: TableSource, batch_size: int = 2) -> list[dict]:
    return [row for batch in source.batches(batch_size) for row in batch.to_pylist()]


def results_for(row_ids: list[int]) -> pa.Table:
    return pa.table({ROW_ID: pa.array(row_ids, pa.int64()), "answer": [f"a{i}" for i in row_ids]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".json", ".ndjson"])
def test_inputs_stream_in_order_with_row_ids(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        write_csv(path, TRICKY_ROWS)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(TRICKY_ROWS), path)
    elif suffix == ".json":
        path.write_text(json.dumps(TRICKY_ROWS, ensure_ascii=False), encoding="utf-8")
    else:
        write_jsonl(path, TRICKY_ROWS)
    with TableSource(path) as src:
        assert src.column_names == ["id", "text"]
        assert src.count_rows() == len(TRICKY_ROWS)
        rows = all_rows(src)
    assert [r[ROW_ID] for r in rows] == list(range(len(TRICKY_ROWS)))
    # CSV values are the file's text (an empty field is null); every other value must come back exactly.
    as_read = str if suffix == ".csv" else int
    got = [{"id": r["id"], "text": r["text"] or ""} for r in rows]
    assert got == [{"id": as_read(r["id"]), "text": r["text"]} for r in TRICKY_ROWS]


def test_columns_known_without_reading_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"a": 1, "b": "x", "zip": "00123"}])
    with TableSource(path) as src:
        # Every CSV column is text: no value is ever re-typed (and re-written) by a sniffer.
        assert [(c.name, c.type) for c in src.columns] == [("a", "VARCHAR"), ("b", "VARCHAR"), ("zip", "VARCHAR")]


def test_row_order_preserved_on_100k_rows(tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["i", "text"])
        for i in range(n):
            writer.writerow([i, "multi\nline, quoted" if i % 7 == 0 else f"row {i}"])
    with TableSource(path) as src:
        seen = 0
        for batch in src.batches(4096):
            ids = batch.column(ROW_ID).to_pylist()
            assert ids == [int(i) for i in batch.column("i").to_pylist()] == list(range(seen, seen + len(ids)))
            seen += len(ids)
    assert seen == n


def test_limit_reads_a_prefix(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", TRICKY_ROWS)
    with TableSource(path, limit=3) as src:
        assert src.count_rows() == 3
        assert [r["id"] for r in all_rows(src)] == ["1", "2", "3"]
        write_output(src, results_for([2, 0, 1]), tmp_path / "out.parquet")
    out = read_table(tmp_path / "out.parquet")
    assert out.column("id").to_pylist() == ["1", "2", "3"]
    assert out.column("answer").to_pylist() == ["a0", "a1", "a2"]


@pytest.mark.parametrize("out_suffix", [".parquet", ".csv", ".jsonl", ".json"])
def test_output_keeps_input_columns_and_order(tmp_path: Path, out_suffix: str) -> None:
    path = write_csv(tmp_path / "in.csv", TRICKY_ROWS)
    out_path = tmp_path / "sub" / f"out{out_suffix}"
    with TableSource(path) as src:
        # Results arrive in any order and may miss rows (nulls in the output).
        write_output(src, results_for([5, 3, 0, 1, 2]), out_path)
    out = read_table(out_path)
    assert out.column_names == ["id", "text", "answer"]
    assert out.column("id").to_pylist() == [str(r["id"]) for r in TRICKY_ROWS]
    assert [t or "" for t in out.column("text").to_pylist()] == [r["text"] for r in TRICKY_ROWS]
    assert out.column("answer").to_pylist() == ["a0", "a1", "a2", "a3", None, "a5"]
    assert sorted(p.name for p in out_path.parent.iterdir()) == [out_path.name]  # no temp files left


def test_csv_output_round_trips_csv_input_bytes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", TRICKY_ROWS[:5])
    with TableSource(path) as src:
        write_output(src, results_for([0, 1, 2, 3, 4]), tmp_path / "out.csv")
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [{"id": int(r["id"]), "text": r["text"]} for r in got] == TRICKY_ROWS[:5]


def test_output_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", TRICKY_ROWS)
    out_path = tmp_path / "out.jsonl"
    out_path.write_text("old\n")
    with TableSource(path) as src:
        write_output(src, results_for([0]), out_path)
    assert read_table(out_path).num_rows == len(TRICKY_ROWS)


def test_missing_and_unknown_inputs_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        TableSource(tmp_path / "nope.csv")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(UsageError, match="unknown file type"):
        TableSource(tmp_path / "data.xlsx")
    # A directory is an input of its files: one of an unknown type is refused, not skipped.
    with pytest.raises(UsageError, match="data.xlsx: unknown file type"):
        TableSource(tmp_path)
    with pytest.raises(UsageError, match="holds no files"):
        TableSource((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_broken_input_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="Cannot read"):
        TableSource(path)


def test_reserved_row_id_column_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{ROW_ID: 1, "text": "x"}])
    with pytest.raises(UsageError, match="reserved"):
        TableSource(path)


def test_check_output_path(tmp_path: Path) -> None:
    inp = write_csv(tmp_path / "in.csv", TRICKY_ROWS)
    with pytest.raises(UsageError, match="is the input"):
        check_output_path(inp, inp)
    with pytest.raises(UsageError, match="is the input"):
        check_output_path(tmp_path / "." / "in.csv", inp)
    with pytest.raises(UsageError, match="unknown file type"):
        check_output_path(tmp_path / "out.txt", inp)
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UsageError, match="directory"):
        check_output_path(tmp_path / "d.parquet", inp)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="not writable"):
        check_output_path(blocker / "out.parquet", inp)
    assert check_output_path(tmp_path / "new" / "out.parquet", inp) == tmp_path / "new" / "out.parquet"
    assert not (tmp_path / "new").exists()  # checks create nothing; the run makes the directory


def test_csv_output_writes_nested_columns_as_json(tmp_path: Path) -> None:
    """CSV has no nested types: lists, structs, maps and fixed-size arrays go as JSON text (non-finite
    floats as JSON output writes them), not DuckDB's `{'k': 'it\\'s'}` / `[a, b, c]`; scalars unchanged."""
    nan = float("nan")
    table = pa.table({
        "text": ["x", "y"],
        "m": pa.array([{"k": "it's", "f": nan}, None]),
        "tags": pa.array([["a, b", "c"], []]),
        "kv": pa.array([[("q\"uote", 1)], None], pa.map_(pa.string(), pa.int64())),
        "fixed": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2)),
        "n": [1.5, None],
    })
    inp = tmp_path / "in.parquet"
    pq.write_table(table, inp)
    with TableSource(inp) as src:
        write_output(src, results_for([0, 1]), tmp_path / "out.csv")
        write_output(src, results_for([0, 1]), tmp_path / "out.parquet")
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [json.loads(r["m"]) if r["m"] else None for r in got] == [{"k": "it's", "f": "NaN"}, None]
    assert [json.loads(r["tags"]) for r in got] == [["a, b", "c"], []]
    assert [json.loads(r["kv"]) if r["kv"] else None for r in got] == [{"q\"uote": 1}, None]
    assert [json.loads(r["fixed"]) for r in got] == [[1, 2], [3, 4]]
    assert [(r["text"], r["n"], r["answer"]) for r in got] == [("x", "1.5", "a0"), ("y", "", "a1")]
    # Other formats keep the nested types.
    assert pq.read_table(tmp_path / "out.parquet").select(["tags", "kv"]).equals(table.select(["tags", "kv"]))


@pytest.mark.parametrize("order", ["fewer_first", "more_first"])
def test_json_files_with_other_keys_are_refused_naming_each_files_own_keys(tmp_path: Path, order: str) -> None:
    more = write_jsonl(tmp_path / "p1.jsonl", [{"text": "a", "k": 1}])
    fewer = write_jsonl(tmp_path / "p2.jsonl", [{"text": "b"}])
    files = [fewer, more] if order == "fewer_first" else [more, fewer]
    with pytest.raises(UsageError) as err:
        TableSource(files)
    message = str(err.value)
    assert f"{more} has (k, text)" in message and f"{fewer} has (text)" in message
    assert message.index(str(files[0])) < message.index(str(files[1]))  # the first file is named first


# DuckDB's read_json infers a schema from its first 20,480 records by default; these files differ after that.
LATE = 25_000


@pytest.mark.parametrize("last", [
    {"text": "z", "n": 1, "late": "x"},  # a key first seen after the sample
    {"text": "z", "n": "not a number"},  # an integer column that turns into text
    {"text": "z", "n": 1.5, "s": {"a": 1, "b": [2]}},  # a double, and an object with a new key
])
def test_json_lines_are_read_whole_whatever_comes_late(tmp_path: Path, last: dict) -> None:
    """A key or type first seen after read_json's sample was refused (`has unknown key "late"`,
    `Failed to cast value`, exit 2) where the same record on line 2 is read."""
    rows = [{"text": "t", "n": i, "s": {"a": i}} for i in range(LATE)] + [last]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with TableSource(path) as src:
        assert set(src.column_names) == set().union(*rows)
        assert src.count_rows() == len(rows)
        write_output(src, results_for([0]), out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(rows)
    assert {k: v for k, v in lines[-1].items() if k in last} == last
    assert (lines[0]["text"], lines[0]["n"], lines[0]["s"]["a"]) == ("t", 0, 0)  # earlier rows as they were


def test_a_json_key_differing_only_in_case_is_refused_wherever_it_first_appears(tmp_path: Path) -> None:
    from batchllm_cli.column_names import check_input_names

    rows = [{"text": "t"} for _ in range(LATE)] + [{"text": "t", "Text": "T"}]
    with TableSource(write_jsonl(tmp_path / "in.jsonl", rows)) as src:
        with pytest.raises(UsageError, match="differ only in upper/lower case"):
            check_input_names(src.file_column_names(), src.column_names)


def test_hive_partitioned_json_with_a_float_column_is_read(tmp_path: Path) -> None:
    """Refused before with `Option filename adds column "__batchllm_file", but a column with this name
    is also in the file`: the exact-number check declared the file-name column as one of the keys."""
    for lang, x in (("en", 1.5), ("fr", 2.25)):
        (tmp_path / f"lang={lang}").mkdir()
        write_jsonl(tmp_path / f"lang={lang}" / "p.jsonl", [{"text": lang, "x": x}])
    assert read_table(tmp_path).to_pylist() == [
        {"text": "en", "x": 1.5, "lang": "en"}, {"text": "fr", "x": 2.25, "lang": "fr"},
    ]
