"""Parquet input types come back as they were, and nothing depends on the machine's time zone. No model.

Parquet output used to keep DuckDB's type wherever a unit differed (duration[us] came back as int64,
timestamp[ms] as timestamp[us], time32 as time64, fixed_size_binary as binary, uuid as string), and a
time zone was printed (templates, CSV, JSON) and tagged (Parquet) in the machine's zone ($TZ): the
same job gave other prompts and outputs on another machine. Through table_io directly; the CLI-level
render check is in test_prompt_options.py.
"""
from __future__ import annotations

import csv
import datetime
import decimal
import json
import uuid
import zoneinfo
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm_cli.errors import UsageError
from batchllm_cli.table_io import ROW_ID, InputOptions, TableSource, write_output
from batchllm_cli.table_io import writing

MACHINE_ZONES = ["UTC", "Asia/Kolkata", "America/Los_Angeles"]
UTC = datetime.timezone.utc
WHEN = datetime.datetime(2024, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)  # 22:04:05.25 the day before in New York
UID = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


def results_for(n: int) -> pa.Table:
    return pa.table({ROW_ID: pa.array(range(n), pa.int64()), "answer": pa.array([f"a{i}" for i in range(n)])})


def uuids(values: list[uuid.UUID | None]) -> pa.Array:
    storage = pa.array([v.bytes if v else None for v in values], pa.binary(16))
    return pa.ExtensionArray.from_storage(pa.uuid(), storage)


def every_type_table() -> pa.Table:
    micros = [1, 86_400_000_000, None]
    return pa.table({
        "text": ["a", "b", None],
        "dur": pa.array(micros, pa.duration("us")),
        "dur_ms": pa.array([1, -2, None], pa.duration("ms")),
        "ts_ms": pa.array([1, 2, None], pa.timestamp("ms")),
        "ts_ms_utc": pa.array([1, 2, None], pa.timestamp("ms", tz="UTC")),
        "ts_ny": pa.array([WHEN, WHEN, None], pa.timestamp("ms", tz="America/New_York")),
        "ts_ns_kolkata": pa.array([1, 2, None], pa.timestamp("ns", tz="Asia/Kolkata")),
        "t32": pa.array([1000, 2, None], pa.time32("ms")),
        "t32_s": pa.array([1, 86399, None], pa.time32("s")),
        "t64_ns": pa.array([1, 2, None], pa.time64("ns")),
        "fbin": pa.array([b"0123456789abcdef", b"\x00" * 16, None], pa.binary(16)),
        "uid": uuids([UID, uuid.UUID(int=1), None]),
        "half": pa.array([1.5, -2.0, None], pa.float16()),
        "fixed_list": pa.array([[1, 2], [3, 4], None], pa.list_(pa.int32(), 2)),
        "zoned_list": pa.array([[WHEN], [], None], pa.list_(pa.timestamp("ms", tz="Asia/Kolkata"))),
        "durations": pa.array([{"d": 5}, {"d": None}, None], pa.struct([("d", pa.duration("s"))])),
        "label": pa.array(["x", "y", None]).dictionary_encode(),
    })


@pytest.mark.parametrize("zone", MACHINE_ZONES)
def test_parquet_output_keeps_every_input_type(tmp_path: Path, machine_zone: Callable[[str], None],
                                               zone: str) -> None:
    machine_zone(zone)
    inp = tmp_path / "in.parquet"
    pq.write_table(every_type_table(), inp)
    stored = pq.read_table(inp)  # the file's own types (Parquet itself stores time32[s] as ms, say)
    with TableSource(inp) as src:
        write_output(src, results_for(3), tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    kept = out.select(stored.column_names)
    changed = {f.name: f"{f.type} -> {kept.schema.field(f.name).type}" for f in stored.schema
               if f.type != kept.schema.field(f.name).type}
    assert changed == {}
    assert kept.equals(stored)
    assert out.column("answer").to_pylist() == ["a0", "a1", "a2"]


def test_a_value_a_restored_type_cannot_hold_keeps_duckdbs_type_and_the_whole_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file's millisecond column, and a second file whose column holds microseconds: DuckDB
    reads both as microseconds, and the second file's 1001 µs has no millisecond value (nor its 1.1 a
    half float: a safe cast would round that one). Found after the first batches were written, the
    output starts again with DuckDB's type for those columns only."""
    monkeypatch.setattr(writing, "_PARQUET_BATCH_ROWS", 2)
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"ts": pa.array([1, 2, 3, 4], pa.timestamp("ms")),
                             "dur": pa.array([1, 2, 3, 4], pa.duration("ms")),
                             "half": pa.array([0.5, 1.5, 2.5, None], pa.float16())}), first)
    pq.write_table(pa.table({"ts": pa.array([1001], pa.timestamp("us")),
                             "dur": pa.array([5], pa.duration("ms")),
                             "half": pa.array([1.1], pa.float32())}), second)
    out = tmp_path / "out" / "out.parquet"
    with TableSource([first, second]) as src:
        write_output(src, results_for(5), out)
    got = pq.read_table(out)
    assert got.schema.field("ts").type == pa.timestamp("us")
    assert got.column("ts").cast(pa.int64()).to_pylist() == [1000, 2000, 3000, 4000, 1001]
    assert got.schema.field("dur").type == pa.duration("ms")  # the other columns are still restored
    assert got.column("dur").cast(pa.int64()).to_pylist() == [1, 2, 3, 4, 5]
    assert got.schema.field("half").type == pa.float32()
    assert got.column("half").to_pylist() == pa.array([0.5, 1.5, 2.5, None, 1.1], pa.float32()).to_pylist()
    assert [p.name for p in out.parent.iterdir()] == ["out.parquet"]  # no temporary file left


@pytest.mark.parametrize("first_type, second_type, second_value", [
    (pa.int64(), pa.float64(), 2.7),  # was read as 3
    (pa.float32(), pa.float64(), 0.123456789012345),  # was read as 0.12345679
    (pa.decimal128(10, 2), pa.decimal128(10, 4), decimal.Decimal("1.2345")),  # was read as 1.23
    (pa.int32(), pa.int64(), 7),  # a widening: read only while every value fits, so refused too
    (pa.timestamp("us"), pa.timestamp("ns"), 1_001),  # the nanoseconds were dropped
    (pa.timestamp("ms", tz="UTC"), pa.timestamp("ms", tz="Asia/Kolkata"), 1),  # printed in UTC
    (pa.list_(pa.int64()), pa.list_(pa.float64()), [2.5]),  # nested: was read as [3]
    (pa.null(), pa.string(), "x"),  # a first file of nulls only (DuckDB failed reading the second)
])
def test_a_column_whose_type_differs_between_files_is_refused_naming_both(
    tmp_path: Path, first_type: pa.DataType, second_type: pa.DataType, second_value: object
) -> None:
    """DuckDB reads every file with the first file's types, so these columns used to come back cast
    (damaged, with exit 0) in the prompts and in every output."""
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": ["a"], "col": pa.array([None], first_type)}), data / "a.parquet")
    pq.write_table(pa.table({"text": ["b"], "col": pa.array([second_value], second_type)}), data / "b.parquet")
    a, b = (pq.read_schema(data / name).field("col").type for name in ("a.parquet", "b.parquet"))  # as stored
    with pytest.raises(UsageError) as refused:
        TableSource(data)
    assert str(refused.value) == (
        f"The input files have different types for column 'col': {data / 'a.parquet'} has {a} but "
        f"{data / 'b.parquet'} has {b}; write the files with one type for it (every file's values "
        f"would be read as {data / 'a.parquet'}'s type)."
    )


def test_types_duckdb_reads_as_one_are_read_exactly(tmp_path: Path) -> None:
    """Differences that hold the same values in DuckDB's one type stay allowed: timestamp units up to
    microseconds, half floats, dictionary-encoded text, a later file's column of nulls only."""
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"ts": pa.array([1], pa.timestamp("ms", tz="UTC")),
                             "half": pa.array([0.5], pa.float16()),
                             "label": pa.array(["x"]).dictionary_encode(),
                             "note": pa.array(["n"])}), first)
    pq.write_table(pa.table({"ts": pa.array([2_001], pa.timestamp("us", tz="UTC")),
                             "half": pa.array([1.1], pa.float32()),
                             "label": pa.array(["y"]),
                             "note": pa.array([None], pa.null())}), second)
    with TableSource([first, second]) as src:
        rows = [r for b in src.batches() for r in b.to_pylist()]
    assert [(r["ts"], r["half"], r["label"], r["note"]) for r in rows] == [
        (datetime.datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), 0.5, "x", "n"),
        (datetime.datetime(1970, 1, 1, 0, 0, 0, 2001, tzinfo=UTC), pa.scalar(1.1, pa.float32()).as_py(), "y", None),
    ]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("zone", MACHINE_ZONES)
def test_time_zones_print_in_the_columns_own_zone_whatever_the_machines(
    tmp_path: Path, machine_zone: Callable[[str], None], zone: str
) -> None:
    machine_zone(zone)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "ny": pa.array([WHEN, None], pa.timestamp("us", tz="America/New_York")),
        "ns": pa.array([1_704_164_645_000_000_001, None], pa.timestamp("ns", tz="Asia/Kolkata")),
        "offset": pa.array([WHEN, None], pa.timestamp("us", tz="+02:00")),
        "utc": pa.array([WHEN, None], pa.timestamp("us", tz="UTC")),
        "old": pa.array([datetime.datetime(1800, 1, 2, 3, 4, 5, tzinfo=UTC), None],
                        pa.timestamp("us", tz="America/New_York")),  # New York's local mean time: -04:56:02
        "nested": pa.array([[WHEN], None], pa.list_(pa.timestamp("us", tz="America/New_York"))),
    }), inp)
    with TableSource(inp) as src:
        # What templates are given (datetime has no nanoseconds: pyarrow refuses that column's values).
        rows = [r for b in src.batches() for r in b.drop_columns(["ns"]).to_pylist()]
        write_output(src, results_for(2), tmp_path / "out.csv")
        write_output(src, results_for(2), tmp_path / "out.jsonl")
    assert str(rows[0]["ny"]) == "2024-01-01 22:04:05.250000-05:00"
    assert rows[0]["ny"].tzinfo == zoneinfo.ZoneInfo("America/New_York")
    assert str(rows[0]["offset"]) == "2024-01-02 05:04:05.250000+02:00"
    assert str(rows[0]["utc"]) == "2024-01-02 03:04:05.250000+00:00"
    assert str(rows[0]["old"]) == "1800-01-01 22:08:03-04:56:02"
    assert str(rows[0]["nested"][0]) == "2024-01-01 22:04:05.250000-05:00"
    want = {
        "ny": "2024-01-01 22:04:05.25-05",
        "ns": "2024-01-02 08:34:05.000000001+05:30",
        "offset": "2024-01-02 05:04:05.25+02",
        "utc": "2024-01-02 03:04:05.25+00",
        "old": "1800-01-01 22:08:03-04:56:02",
    }
    first_csv = csv_rows(tmp_path / "out.csv")[0]
    assert {k: first_csv[k] for k in want} == want
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {k: lines[0][k] for k in want} == want
    assert lines[1]["ny"] is None and csv_rows(tmp_path / "out.csv")[1]["ny"] == ""
    assert lines[0]["nested"] == ["2024-01-02 03:04:05.25+00"]  # inside a list: UTC, with its offset


@pytest.mark.parametrize("zone", MACHINE_ZONES)
def test_where_reads_times_in_utc_whatever_the_machines_zone(
    tmp_path: Path, machine_zone: Callable[[str], None], zone: str
) -> None:
    machine_zone(zone)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"ts": pa.array([WHEN], pa.timestamp("us", tz="America/New_York"))}), inp)
    with TableSource(inp, options=InputOptions(where="ts::DATE = DATE '2024-01-02'")) as src:
        assert src.count_rows() == 1


def test_csv_and_json_output_print_these_types_as_text(tmp_path: Path) -> None:
    inp = tmp_path / "in.parquet"
    pq.write_table(every_type_table(), inp)
    with TableSource(inp) as src:
        write_output(src, results_for(3), tmp_path / "out.csv")
        write_output(src, results_for(3), tmp_path / "out.jsonl")
    want = {
        "uid": str(UID),  # the canonical form
        "fbin": "0123456789abcdef",  # as DuckDB prints any blob
        "dur": "1",  # DuckDB reads a Parquet duration as its count of the column's unit
        "ts_ms": "1970-01-01 00:00:00.001",
        "t32": "00:00:01",
        "half": "1.5",
        "fixed_list": "[1,2]",
    }
    first_csv = csv_rows(tmp_path / "out.csv")[0]
    assert {k: first_csv[k] for k in want} == want
    first_json = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert {k: first_json[k] for k in want} == {**want, "dur": 1, "half": 1.5, "fixed_list": [1, 2]}
