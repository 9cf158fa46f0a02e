"""CSV dialect choices that used to lose rows or refuse valid files: line endings around a quoted line
break in the header, a delimiter character inside a one-column header, and the independent record count
that refuses a read which came back short. No model."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchllm_cli.errors import InputError
from batchllm_cli.table_io import TableSource, _csv_records, read_table


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
