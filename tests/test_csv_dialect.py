"""CSV dialect choices that used to lose rows or refuse valid files: line endings around a quoted line
break in the header, a delimiter character inside a one-column header, and the independent record count
that refuses a read which came back short. No model."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchllm_cli.errors import InputError
from batchllm_cli.table_io import ROW_ID, TableSource, _csv_records, csv_dialect, read_table
from batchllm_cli.table_io.csv_dialect import mixed_line_endings


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # DuckDB's strict reader read these as 0 rows, exit 0 (a quoted line break in a CRLF header).
        (b'"new\nline"\r\nv0-0\r\nv0-1\r\n', [{"new\nline": "v0-0"}, {"new\nline": "v0-1"}]),
        (b'"new\r\nline"\r\nv0-0\r\nv0-1\r\n', [{"new\r\nline": "v0-0"}, {"new\r\nline": "v0-1"}]),
        (b'"a\nb",c\r\n1,2\r\n3,"x\r\ny"\r\n', [{"a\nb": "1", "c": "2"}, {"a\nb": "3", "c": "x\r\ny"}]),
        (b'h\r\n"a\nb"\r\nv\r\n', [{"h": "a\nb"}, {"h": "v"}]),
    ],
)
def test_crlf_file_with_quoted_line_breaks_reads_every_row(tmp_path: Path, content: bytes, expected: list) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    with TableSource(path) as src:
        assert src.validate() == len(expected)
    assert read_table(path).to_pylist() == expected


@pytest.mark.parametrize("header", ["semi;colon", "tab\there", "pipe|d", "a;b;c"])
def test_one_column_header_with_a_delimiter_character_is_one_column(tmp_path: Path, header: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text(f"{header}\nfirst\nsecond\n", encoding="utf-8")
    assert read_table(path).to_pylist() == [{header: "first"}, {header: "second"}]


def test_semicolon_files_still_split_on_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a;b\n1;2,5\n3;4\n", encoding="utf-8")
    assert read_table(path).to_pylist() == [{"a": "1", "b": "2,5"}, {"a": "3", "b": "4"}]


def test_independent_count_matches_duckdb_on_blank_lines(tmp_path: Path) -> None:
    one = tmp_path / "one.csv"
    one.write_text("h\n\na\n\nb\n\n", encoding="utf-8")  # a blank line is a null in a one-column file
    wide = tmp_path / "wide.csv"
    wide.write_text("h,g\n\na,1\n\nb,2\n\n", encoding="utf-8")  # and nothing in a wider one
    for path in (one, wide):
        with TableSource(path) as src:
            assert src.validate() == _csv_records(path, ",", len(src.columns) == 1)


def test_a_short_read_is_refused_not_written(tmp_path: Path) -> None:
    """The guard itself: a source whose dialect makes DuckDB read fewer rows than the file has (here
    the pre-fix strict reading of a CRLF file with a quoted header break) fails instead of passing."""
    path = tmp_path / "in.csv"
    path.write_bytes(b'"new\nline"\r\nv0-0\r\nv0-1\r\n')
    with TableSource(path) as src:
        assert src._dialect is not None
        object.__setattr__(src._dialect, "crlf_quoted_header", False)
        with pytest.raises(InputError, match="2 records but only 0 were read"):
            src.validate()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'"a\nb",c\r\n1,2\r\n3,4,5\r\n6,7\r\n', "line 4: expected 2 fields, found 3"),  # was read as 3,4
        (b'"a\nb",c\r\n1,"2\r\n6,7\r\n', "unexpected end of data"),  # was one row holding "2\r\n6,7"
    ],
)
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_malformed_records_in_a_crlf_file_with_a_header_line_break_are_refused(
    tmp_path: Path, content: bytes, reason: str, skip_bad_rows: bool
) -> None:
    """Such a file is read by DuckDB's lenient mode, which would cut or merge these records silently."""
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    with TableSource(path, skip_bad_rows=skip_bad_rows) as src:
        with pytest.raises(InputError, match=reason):
            src.validate()


def _rows(src: TableSource) -> list[dict]:
    return [{k: v for k, v in r.items() if k != ROW_ID} for b in src.batches() for r in b.to_pylist()]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # rows appended with '\n' to a file Python's csv module wrote with '\r\n' (DuckDB's strict reader
        # failed: "The CSV Parser state machine reached an invalid state", and so did --skip-bad-rows)
        (b"a,b\r\n1,x\r\n2,y\n", [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}]),
        (b"a,b\n1,x\n2,y\r\n3,z\r\n", [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}, {"a": "3", "b": "z"}]),
        (b'a,b\r\n1,"x\r\ny"\r\n2,"p\nq"\n3,\n4,""\r\n5,z',
         [{"a": "1", "b": "x\r\ny"}, {"a": "2", "b": "p\nq"}, {"a": "3", "b": None}, {"a": "4", "b": ""},
          {"a": "5", "b": "z"}]),
    ],
)
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_mixed_line_endings_are_read_as_written(
    tmp_path: Path, content: bytes, expected: list, skip_bad_rows: bool
) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    with TableSource(path, skip_bad_rows=skip_bad_rows) as src:
        assert src.validate() == len(expected)
        assert src.rejects is None or src.rejects.num_rows == 0
        assert _rows(src) == expected


@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_malformed_record_among_mixed_line_endings_names_the_line_and_the_fix(
    tmp_path: Path, skip_bad_rows: bool
) -> None:
    """Read leniently, the extra field would be dropped silently; Python's strict reader refuses it, and
    the message says why --skip-bad-rows cannot help instead of suggesting it."""
    path = tmp_path / "in.csv"
    path.write_bytes(b"a,b\r\n1,x\r\n2,y,extra\n3,z\n")
    with TableSource(path, skip_bad_rows=skip_bad_rows) as src:
        with pytest.raises(InputError) as err:
            src.validate()
    message = str(err.value)
    assert "line 3: expected 2 fields, found 3" in message
    assert "mixes line endings: line 1 ends with \\r\\n, line 3 with \\n" in message
    assert "pass --skip-bad-rows" not in message


def test_mixed_line_endings_are_found_across_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csv_dialect, "_HEAD_BYTES", 8)  # a '\r\n' split between two reads
    path = tmp_path / "in.csv"
    path.write_bytes(b"a,b\r\n1,xy\r\n22,y\r\n3,z\n")
    assert mixed_line_endings(path) == "line 1 ends with \\r\\n, line 4 with \\n"
    path.write_bytes(b"a,b\r\n1,xy\r\n22,y\r\n")
    assert mixed_line_endings(path) is None
    path.write_bytes(b"a,b\n1,x\n2,y\r\n")
    assert mixed_line_endings(path) == "line 1 ends with \\n, line 3 with \\r\\n"


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b'a,b\r\n1,"x\ny"\r\n2,z\r\n', None),  # line breaks inside quoted values are values
        (b'a,b\n1,"x\r\ny"\n2,"p""\r\nq"\n', None),  # a doubled quote does not end the value
        (b'"a\nb",c\r\n1,2\n', "line 2 ends with \\r\\n, line 3 with \\n"),  # the header's own break is a value
    ],
)
def test_line_breaks_inside_quotes_are_not_line_endings(tmp_path: Path, content: bytes, where: str | None) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    assert mixed_line_endings(path) == where


def test_a_bad_record_in_a_crlf_file_with_quoted_lf_values_is_still_rejected(tmp_path: Path) -> None:
    """Not a file with mixed line endings: --skip-bad-rows rejects its malformed record as before."""
    path = tmp_path / "in.csv"
    path.write_bytes(b'a,b\r\n1,"x\ny"\r\n2,y,extra\r\n3,z\r\n')
    with TableSource(path, skip_bad_rows=True) as src:
        assert src.validate() == 2
        assert src.rejects is not None and src.rejects.column("error_type").to_pylist() == ["TOO MANY COLUMNS"]
