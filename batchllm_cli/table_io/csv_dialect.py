"""CSV dialect: header, delimiter, line endings, column names, and an independent record count."""
from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import pyarrow as pa

from batchllm_cli.errors import InputError
from batchllm_cli.table_io.common import CSV_MAX_LINE_SIZE, _CSV_DELIMITERS, _LINE_BREAK, _literal, duckdb_key
from batchllm_cli.table_io.inputs import gzip_read_errors, open_text


_HEAD_BYTES = 1 << 20
_SAMPLE_RECORDS = 50


@dataclass(frozen=True)
class CsvText:
    """How Python reads a local CSV file as text: its encoding (Python's name) and compression."""

    encoding: str = "utf-8-sig"
    compression: str | None = None


def _csv_head(path: Path, text: CsvText = CsvText()) -> tuple[str, bool]:
    """The file's first million characters, and whether that is the whole file."""
    with open_text(path, text.encoding, text.compression) as f:
        head = f.read(_HEAD_BYTES + 1)
    return head[:_HEAD_BYTES], len(head) <= _HEAD_BYTES


def _header_and_end(text: str) -> str:
    """The header record with its line break (none at the end of the text)."""
    in_quotes = False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return text[: i + 2] if text[i : i + 2] == "\r\n" else text[: i + 1]
    return text


def _csv_header_line(path: Path, text: CsvText = CsvText()) -> str:
    """The header record (a quoted name may hold a line break)."""
    return _header_and_end(_csv_head(path, text)[0]).rstrip("\r\n")


def _csv_records(path: Path, delimiter: str, single_column: bool, text: CsvText = CsvText()) -> int | None:
    """The data records in a CSV file as Python's csv module counts them (an independent reader), or
    None when it cannot tell. A blank line is a record (a null) in a one-column file, and nothing in a
    wider one, as DuckDB reads them. Streams the file: seconds per GB, nothing next to inference."""
    csv.field_size_limit(CSV_MAX_LINE_SIZE)
    try:
        with open_text(path, text.encoding, text.compression) as f:
            records = sum(1 for row in csv.reader(f, delimiter=delimiter) if row or single_column)
    except (csv.Error, OSError):
        return None
    return max(records - 1, 0)


def _csv_bad_record(path: Path, delimiter: str, fields: int, text: CsvText = CsvText()) -> str | None:
    """The first record with another number of fields than `fields`, or with a broken quote, as
    'line N: reason'; None when every record is well formed (Python's strict csv reader decides)."""
    csv.field_size_limit(CSV_MAX_LINE_SIZE)
    with open_text(path, text.encoding, text.compression, errors="strict") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            for row in reader:
                if row and len(row) != fields:
                    return f"line {reader.line_num}: expected {fields} fields, found {len(row)}"
        except csv.Error as exc:
            return f"line {reader.line_num}: {exc}"
        except UnicodeDecodeError:
            return "it is not UTF-8" if text.encoding.startswith("utf-8") else f"it is not {text.encoding}"
    return None


def _field_counts(text: str, whole: bool, delimiter: str) -> list[int]:
    """Fields per record for the first records of `text` (blank lines skipped; a record the cut of a
    partial head may have split is left out)."""
    try:
        rows = [len(r) for r in itertools.islice(csv.reader(io.StringIO(text), delimiter=delimiter), _SAMPLE_RECORDS + 1) if r]
    except csv.Error:
        return []
    if not whole or len(rows) > _SAMPLE_RECORDS:
        rows = rows[:-1] or rows[:1]
    return rows


def _csv_delimiter(text: str, whole: bool = True) -> str:
    """The candidate that splits the header and agrees with the most of the first data records on the
    number of fields (all of them when the file is a header alone); ',' when none splits the header
    into fields that some data record has too ("semi;colon" over one-field lines is one column). A
    broken line among good ones does not change the choice, so the strict read names it."""
    best, best_key = ",", (0, 0, False)
    for d in _CSV_DELIMITERS:
        counts = _field_counts(text, whole, d)
        if not counts or counts[0] < 2:
            continue
        matches = sum(n == counts[0] for n in counts[1:])
        if matches == 0 and len(counts) > 1:
            continue
        key = (matches, counts[0], d == ",")
        if key > best_key:
            best, best_key = d, key
    return best


def _header_breaks_crlf(header_and_end: str) -> bool:
    """Whether a CRLF file's header has a line break inside quotes: DuckDB's strict reader takes the
    file for '\\n'-ended from it and reads no rows at all, without an error."""
    return header_and_end.endswith("\r\n") and any(ch in header_and_end[:-2] for ch in "\r\n")


_LINE_END = re.compile(r"\r?\n")
_LINE_END_NAMES = {"\r\n": "\\r\\n", "\n": "\\n"}


class _RecordEnds:
    """The kind of line end that ends records, followed through a file read in pieces. Line ends
    inside a quoted value are the value's and are left out (RFC 4180 quoting: the quote state flips at
    every '"', a doubled quote flipping it twice)."""

    def __init__(self) -> None:
        self.first: str | None = None  # the kind that ends the first record
        self.first_line = 0
        self.quoted = False  # inside a quoted value where the next piece starts
        self.lines = 0  # line ends before the next piece

    def other(self, data: str) -> int | None:
        """The line (1-based) of the first record in `data` that ends otherwise than the first one."""
        ends, crlf = data.count("\n"), data.count("\r\n")
        try:
            if self.first is not None and crlf == (ends if self.first == "\r\n" else 0):
                self.quoted ^= data.count('"') % 2 == 1  # every line ends alike: no need to look closer
                return None
            return self._look(data)
        finally:
            self.lines += ends

    def _look(self, data: str) -> int | None:
        start = 0
        for i, end in enumerate(_LINE_END.finditer(data)):
            self.quoted ^= data.count('"', start, end.start()) % 2 == 1
            start = end.end()
            if self.quoted:
                continue
            if self.first is None:
                self.first, self.first_line = end.group(), self.lines + i + 1
            elif end.group() != self.first:
                return self.lines + i + 1
        self.quoted ^= data.count('"', start) % 2 == 1
        return None


def mixed_line_endings(path: Path, text: CsvText = CsvText()) -> str | None:
    """Where a file mixes '\r\n' and '\n' record endings (rows appended with '\n' to a file Python's csv
    module wrote with '\r\n' do), as 'line 1 ends with ..., line N with ...'; None when every record
    ends alike (line breaks inside quoted values are values, of either kind). Streams the file: counts
    per megabyte, and a line-by-line look only at a megabyte whose line ends differ."""
    ends = _RecordEnds()
    carry = ""  # a '\r' at the end of a read, whose '\n' may start the next one
    with open_text(path, text.encoding, text.compression) as f:
        while True:
            chunk = f.read(_HEAD_BYTES)
            data, carry = carry + chunk, ""
            if chunk.endswith("\r"):
                data, carry = data[:-1], "\r"
            if not data:
                return None
            line = ends.other(data)
            if line is not None:
                assert ends.first is not None
                other = "\n" if ends.first == "\r\n" else "\r\n"
                return (f"line {ends.first_line} ends with {_LINE_END_NAMES[ends.first]}, line {line} with "
                        f"{_LINE_END_NAMES[other]}")


@dataclass(frozen=True)
class CsvDialect:
    delimiter: str
    names: tuple[str, ...]
    # DuckDB 2.0 reads such a file right only when told its line ending and not in strict mode.
    crlf_quoted_header: bool = False
    # Where the file mixes '\r\n' and '\n' line endings (mixed_line_endings), which DuckDB's strict mode
    # cannot read ("state machine reached an invalid state"): it is read in lenient mode instead.
    mixed_line_endings: str | None = None

    @property
    def lenient(self) -> bool:
        """Read in DuckDB's lenient mode, which pads, cuts or merges malformed records silently: every
        record is then checked by Python's strict reader instead (check_lenient_read)."""
        return self.crlf_quoted_header or self.mixed_line_endings is not None

    def read_mode(self) -> str:
        """read_csv's options for this dialect's mode."""
        if self.crlf_quoted_header:
            return "strict_mode=false, new_line='\\r\\n'"
        return "strict_mode=false" if self.mixed_line_endings is not None else "strict_mode=true"

    def lenient_reason(self) -> str:
        if self.crlf_quoted_header:
            return "a CRLF file whose header holds a line break"
        return f"a file that mixes line endings: {self.mixed_line_endings}; saved with one kind of line ending, it can"


def _csv_options(delimiter: str, encoding: str = "utf-8") -> list[str]:
    return [
        f"delim={_literal(delimiter)}",
        f"encoding={_literal(encoding)}",
        "quote='\"'",
        "escape='\"'",
        "header=true",
        f"max_line_size={CSV_MAX_LINE_SIZE}",
    ]


def _sniff_csv(
    scan_path: str, path: Path, con: duckdb.DuckDBPyConnection, text_of: CsvText = CsvText(),
    *, delimiter: str | None = None, duckdb_encoding: str = "utf-8",
) -> CsvDialect:
    """The delimiter (`delimiter`, else from the first records) and the column names (DuckDB's, for
    unique names)."""
    text, whole = _csv_head(path, text_of)
    delim = delimiter or _csv_delimiter(text, whole)
    header_and_end = _header_and_end(text)
    header = header_and_end.rstrip("\r\n")
    crlf = _header_breaks_crlf(header_and_end)
    try:
        # Every column is read as text, so only the names matter here; ignore_errors keeps a bad line
        # in the sample from hiding them (the strict read names it).
        rows = con.execute(
            f"SELECT Columns FROM sniff_csv({_literal(scan_path)}, {', '.join(_csv_options(delim, duckdb_encoding))}, "
            "all_varchar=true, ignore_errors=true)"
        ).fetchall()
        row = rows[0] if rows else None
    except duckdb.Error:
        row = None
    if row is not None and row[0]:
        names = tuple(c["name"] for c in row[0])
        # DuckDB trims spaces from header names (`a, a,a ` reads as a, a_1, a_2): the file's own
        # names are kept whenever DuckDB can hold them (not empty, distinct as DuckDB compares names).

        own = next(csv.reader(io.StringIO(header), delimiter=delim), [])
        if len(own) == len(names) and all(own) and len({duckdb_key(n) for n in own}) == len(own):
            names = tuple(own)
        return CsvDialect(delim, names, crlf)
    # The sniffer gives up on some broken files (an unterminated quote in the sample): take the names
    # from the header, so the strict read reports the bad line.
    names = next(csv.reader(io.StringIO(header), delimiter=delim), []) or ["column0"]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        unique.append(name)
    return CsvDialect(delim, tuple(unique), crlf)


def _one_per_record(rejects: pa.Table) -> pa.Table:
    """One rejects entry per record: a quote that never closes swallows the lines after it into one
    DuckDB reject, but each of those lines is a record of its own (what a reader of the file counts), so
    such a reject becomes one entry per line, numbered from its first line. This keeps
    rows read + rejected = records."""
    out: list[dict[str, object]] = []
    for r in rejects.to_pylist():
        lines = _LINE_BREAK.split(r["csv_line"] or "")
        if lines and lines[-1] == "":
            lines.pop()
        if r["error_type"] != "UNQUOTED VALUE" or len(lines) < 2:
            out.append(r)
            continue
        out += [{**r, "line": r["line"] + k, "csv_line": line} for k, line in enumerate(lines)]
    return pa.Table.from_pylist(out, schema=rejects.schema)


def check_lenient_read(files: Sequence[tuple[str, Path, CsvText]], dialect: CsvDialect) -> None:
    """Files DuckDB can only read in its lenient mode (a CRLF file whose header holds a quoted line
    break, a file that mixes line endings), which pads, cuts or merges malformed records silently, are checked record by record here.
    `files` are (name for messages, local path, how to read it as text)."""
    if not dialect.lenient:
        return
    for name, path, text in files:
        with gzip_read_errors(name):
            bad = _csv_bad_record(path, dialect.delimiter, len(dialect.names), text)
        if bad is not None:
            raise InputError(
                f"Cannot read {name}: {bad}. Fix the file (--skip-bad-rows cannot skip records in "
                f"{dialect.lenient_reason()})."
            )


def check_record_count(label: str, files: Sequence[tuple[str, Path, CsvText]], dialect: CsvDialect, rows: int) -> None:
    """InputError unless DuckDB read as many rows as an independent reader counts records in `files`:
    DuckDB has read some valid files (a quoted line break in a CRLF header) as 0 rows without an error."""
    records = 0
    for name, path, text in files:
        with gzip_read_errors(name):
            counted = _csv_records(path, dialect.delimiter, len(dialect.names) == 1, text)
        if counted is None:
            return
        records += counted
    if records != rows:
        raise InputError(
            f"Cannot read {label}: it has {records} records but only {rows} were read; the file's "
            "layout (line endings, quoted line breaks) is not read reliably. Save it with plain '\\n' "
            "line endings, or convert it to Parquet or JSON lines."
        )
