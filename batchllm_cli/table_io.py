"""All table reading and writing: the one module that talks to DuckDB.

Input rows are streamed as Arrow record batches with an explicit ordinal row id, so the rest of the CLI
never depends on DuckDB's ordering rules; the output is a DuckDB join of the input (read a second time)
with the result columns on that row id, written to a temporary file and renamed into place.

CSV input is read strictly (RFC 4180 quoting with `"`, the delimiter taken from the header line) so that
a malformed file fails with DuckDB's error naming the line instead of being silently read with another
dialect; `skip_bad_rows` rejects such lines instead and keeps them (line number, error type, text) for a
rejects file. Values are never rewritten on the way through:
- CSV columns are read as text (VARCHAR), exactly as in the file (`00501`, `1.50`, `t`, `01/02/2024`);
  an empty field is NULL, `""` is empty text, and CSV output writes them back the same way.
- JSON keeps its own types: strings DuckDB would take for dates, times or UUIDs stay strings, and a
  top-level number column whose values are all integers is read exactly (DECIMAL(38,0), or the digits
  as text beyond that) instead of as doubles. JSON output writes NaN/Infinity/-Infinity as the strings
  "NaN", "Infinity", "-Infinity" (the protobuf JSON convention), so every line is valid JSON.
- Parquet types (time zones, decimals, dictionaries, nested values) pass through; HUGEINT, which
  Parquet cannot hold, is written as DECIMAL(38,0), never as a double.
Every path DuckDB sees is a plain-named symlink (plain_paths.py): a user's path is never a glob.
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm_cli.durable import check_writable_dir, fsync_dir, fsync_file, is_disk_full, temp_name
from batchllm_cli.errors import InputError, OutputError, TempFailError, UsageError
from batchllm_cli.plain_paths import PlainPaths

# The ordinal row id travels with every batch and result; the name is unlikely to clash with a user's
# column, and a clash is refused up front rather than silently shadowed.
ROW_ID = "__batchllm_row_id"

INPUT_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# `.json` output is newline-delimited JSON too: it streams, and every JSON reader we care about takes it.
OUTPUT_FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
}
# USE_TMP_FILE false: DuckDB writes into our own temporary file (through its plain-named link) instead of
# renaming a file of its own over the link; the rename into place is ours (_copy_atomically).
_COPY_OPTIONS = {
    "parquet": "FORMAT parquet, USE_TMP_FILE false",
    "csv": "FORMAT csv, HEADER true, USE_TMP_FILE false",
    "json": "FORMAT json, USE_TMP_FILE false",
}

_PARQUET_BATCH_ROWS = 122_880  # DuckDB's row group size: Parquet output keeps the same row groups

# Rows longer than DuckDB's 2 MB default (a long document in one cell) are legitimate input; a prompt
# that long becomes a per-row "prompt too long" error later instead of failing the whole file.
CSV_MAX_LINE_SIZE = 64 * 2**20
_CSV_DELIMITERS = (",", ";", "\t", "|")
# DuckDB's CSV errors carry the reason on a later line; these start the lines worth quoting.
_CSV_REASONS = (
    "Expected Number of Columns",
    "Value with unterminated quote",
    "Invalid unicode",
    "Error when converting column",
    "Maximum line size",
)
_SCALAR_ID_TYPES = ("LIST", "STRUCT", "MAP", "UNION", "[]")
# --max-rejects: more rejected records than this fail the job (a file that bad is the wrong file, or
# needs fixing, not a run that quietly drops rows).
DEFAULT_MAX_REJECTS = 100
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# read_json's default sample_size: the records its schema (and so its column names) comes from.
JSON_KEY_SAMPLE = 20480


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _one_line(exc: BaseException) -> str:
    """DuckDB's headline, plus the reason line of a CSV error (the CLI contract is one line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0]
    if "CSV Error on Line" in head:
        reason = next((line for line in lines[1:] if line.startswith(_CSV_REASONS)), None)
        if reason:
            head = f"{head.rstrip('.')}: {reason}"
    return head


def _write_error(path: Path, exc: BaseException) -> Exception:
    """The error to raise when writing `path` failed: disk full is temporary (75), the rest fatal."""
    if is_disk_full(exc):
        return TempFailError(
            f"Cannot write {path}: no space left on device. Finished rows are kept; free some space and "
            "run the same command again to resume."
        )
    return OutputError(f"Cannot write {path}: {_one_line(exc)}")


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"Cannot read {path}: unknown file type {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(INPUT_FORMATS)}."
        )
    return fmt


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"Cannot write {path}: unknown file type {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(OUTPUT_FORMATS)}."
        )
    return fmt


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB's type name, e.g. VARCHAR, BIGINT, STRUCT(...)


def _connect(plain: PlainPaths) -> duckdb.DuckDBPyConnection:
    """A connection whose spill files go to `plain`'s private directory (close it before `plain`),
    never to `.tmp` in the user's current directory."""
    con = duckdb.connect(":memory:", config={"temp_directory": plain.spill_dir()})
    con.execute("SET enable_progress_bar = false")  # a long read would draw on the user's terminal
    # The default, set explicitly because row ids and output order rely on it.
    con.execute("SET preserve_insertion_order = true")
    return con


def _is_blank_file(path: Path) -> bool:
    """0 bytes, or only whitespace (an 'empty' CSV/JSON file as editors and scripts leave them)."""
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 4096:
        return False
    return not path.read_bytes().strip(b" \t\r\n\xef\xbb\xbf")


_HEAD_BYTES = 1 << 20
_SAMPLE_RECORDS = 50


def _csv_head(path: Path) -> tuple[str, bool]:
    """The file's first MB as text, and whether that is the whole file."""
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES + 1)
    return head[:_HEAD_BYTES].decode("utf-8-sig", errors="replace"), len(head) <= _HEAD_BYTES


def _header_and_end(text: str) -> str:
    """The header record with its line break (none at the end of the text)."""
    in_quotes = False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return text[: i + 2] if text[i : i + 2] == "\r\n" else text[: i + 1]
    return text


def _csv_header_line(path: Path) -> str:
    """The header record (a quoted name may hold a line break)."""
    return _header_and_end(_csv_head(path)[0]).rstrip("\r\n")


def _csv_records(path: Path, delimiter: str, single_column: bool) -> int | None:
    """The data records in a CSV file as Python's csv module counts them (an independent reader), or
    None when it cannot tell. A blank line is a record (a null) in a one-column file, and nothing in a
    wider one, as DuckDB reads them. Streams the file: seconds per GB, nothing next to inference."""
    csv.field_size_limit(CSV_MAX_LINE_SIZE)
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
            records = sum(1 for row in csv.reader(f, delimiter=delimiter) if row or single_column)
    except (csv.Error, OSError):
        return None
    return max(records - 1, 0)


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


@dataclass(frozen=True)
class CsvDialect:
    delimiter: str
    names: tuple[str, ...]
    # DuckDB 2.0 reads such a file right only when told its line ending and not in strict mode.
    crlf_quoted_header: bool = False


def _csv_options(delimiter: str) -> list[str]:
    return [
        f"delim={_literal(delimiter)}",
        "quote='\"'",
        "escape='\"'",
        "header=true",
        f"max_line_size={CSV_MAX_LINE_SIZE}",
    ]


def _sniff_csv(scan_path: str, path: Path, con: duckdb.DuckDBPyConnection) -> CsvDialect:
    """The delimiter (from the first records) and the column names (DuckDB's, for unique names)."""
    text, whole = _csv_head(path)
    delim = _csv_delimiter(text, whole)
    header_and_end = _header_and_end(text)
    header = header_and_end.rstrip("\r\n")
    crlf = _header_breaks_crlf(header_and_end)
    try:
        # Every column is read as text, so only the names matter here; ignore_errors keeps a bad line
        # in the sample from hiding them (the strict read names it).
        rows = con.execute(
            f"SELECT Columns FROM sniff_csv({_literal(scan_path)}, {', '.join(_csv_options(delim))}, "
            "all_varchar=true, ignore_errors=true)"
        ).fetchall()
        row = rows[0] if rows else None
    except duckdb.Error:
        row = None
    if row is not None and row[0]:
        names = tuple(c["name"] for c in row[0])
        # DuckDB trims spaces from header names (`a, a,a ` reads as a, a_1, a_2): the file's own
        # names are kept whenever DuckDB can hold them (not empty, distinct as DuckDB compares names).
        from batchllm_cli.column_names import duckdb_key  # column_names imports this module

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


# JSON has no dates, times or UUIDs: strings DuckDB's sniffer takes for them stay the strings they are.
_JSON_STRING_TYPES = frozenset({
    "date", "time", "time with time zone", "time_ns", "timestamp", "timestamp with time zone",
    "timestamp_ns", "timestamp_ms", "timestamp_s", "uuid", "interval",
})


def _json_read_type(typ: duckdb.DuckDBPyType) -> str:
    """The SQL type to read a sniffed JSON value as: the sniffed one, with strings kept strings."""
    if typ.id in _JSON_STRING_TYPES:
        return "VARCHAR"
    if typ.id == "struct":
        return "STRUCT(" + ", ".join(f"{_ident(n)} {_json_read_type(t)}" for n, t in typ.children) + ")"
    if typ.id == "list":
        return _json_read_type(typ.children[0][1]) + "[]"
    if typ.id == "map":
        (_, key), (_, value) = typ.children
        return f"MAP({_json_read_type(key)}, {_json_read_type(value)})"
    return str(typ)


def _exact_json_columns(
    con: duckdb.DuckDBPyConnection, read_json: Callable[[str], str], rel: duckdb.DuckDBPyRelation
) -> tuple[Column, ...] | None:
    """Declared columns for a JSON read that keeps every value exact, or None when the sniffed ones do.

    DuckDB reads a number column as DOUBLE as soon as one value does not fit BIGINT, which rounds every
    integer beyond 2^53; such a column whose values are all integers is read as DECIMAL(38,0) (exact),
    or as the digits' text when one has more than 38 digits. Any other column holding doubles (a mixed
    number column, a list or struct of numbers) in which some number has 16 or more digits in a row
    (so a double may round it) is read as JSON: its values' own text, exactly.
    """
    cols = [Column(n, _json_read_type(t)) for n, t in zip(rel.columns, rel.types)]
    doubles = [c.name for c in cols if c.type == "DOUBLE"]
    nested = [c.name for c in cols if c.type != "DOUBLE" and "DOUBLE" in c.type.upper()]
    if doubles or nested:
        as_json = ", ".join(
            f"{_literal(c.name)}: {_literal('JSON' if c.name in doubles or c.name in nested else c.type)}" for c in cols
        )
        long_digits = "bool_or(regexp_matches({}::VARCHAR, '[0-9]{{16,}}'))"
        checks = [
            f"bool_and(regexp_full_match({_ident(n)}::VARCHAR, '-?[0-9]+')), "
            f"bool_and({_ident(n)} IS NULL OR try_cast({_ident(n)}::VARCHAR AS DECIMAL(38,0)) IS NOT NULL), "
            + long_digits.format(_ident(n))
            for n in doubles
        ] + [long_digits.format(_ident(n)) for n in nested]
        found = con.execute(f"SELECT {', '.join(checks)} FROM {read_json(as_json)}").fetchall()[0]
        exact: dict[str, str] = {}
        for i, n in enumerate(doubles):
            whole, fits, long = found[3 * i : 3 * i + 3]
            if whole:
                exact[n] = "DECIMAL(38,0)" if fits else "VARCHAR"
            elif long:
                exact[n] = "JSON"
        for n, long in zip(nested, found[3 * len(doubles) :]):
            if long:
                exact[n] = "JSON"
        cols = [Column(c.name, exact.get(c.name, c.type)) for c in cols]
    sniffed = [Column(n, str(t)) for n, t in zip(rel.columns, rel.types)]
    return tuple(cols) if cols != sniffed else None


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


def _check_input_file(path: Path) -> None:
    """UsageError unless `path`, taken literally, is one existing regular file (a symlink to one is)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"Input file not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"Input is not a file: {path} is a directory or a special file; give one regular file.")
    if not os.access(path, os.R_OK):
        raise UsageError(f"Cannot read {path}: permission denied.")


class TableSource:
    """An input table: its columns (known without reading the data) and its rows as Arrow batches.

    `limit` keeps only the first N rows everywhere (stream, count and output join), so a --limit run
    is a consistent prefix of the table. `skip_bad_rows` (CSV only) drops malformed lines instead of
    failing; `validate()` reads the whole table once, counts the rows and collects the rejected lines.
    A blank file (0 bytes or only whitespace) is an empty table with no columns.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        limit: int | None = None,
        *,
        skip_bad_rows: bool = False,
        max_rejects: int = DEFAULT_MAX_REJECTS,
    ) -> None:
        self.path = Path(path)
        _check_input_file(self.path)
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 or more.")
        self.format = input_format(self.path)
        if skip_bad_rows and self.format != "csv":
            raise UsageError(f"--skip-bad-rows applies to CSV input only; {self.path} is {self.format}.")
        if max_rejects < 0:
            raise UsageError("--max-rejects must be 0 or more.")
        self.limit = limit
        self.skip_bad_rows = skip_bad_rows
        self.max_rejects = max_rejects
        self.empty = self.format != "parquet" and _is_blank_file(self.path)
        self._rows: int | None = None
        self.rejects: pa.Table | None = None  # line, error_type, error, csv_line (after validate())
        self._dialect: CsvDialect | None = None
        self._json_columns: tuple[Column, ...] | None = None
        self.arrow_schema: pa.Schema | None = None  # a Parquet input's own types, kept in Parquet output
        self._plain = PlainPaths()
        self._con = _connect(self._plain)
        if self.empty:
            self.columns: tuple[Column, ...] = ()
            return
        try:
            # DuckDB only ever sees this plain name; the kernel resolves the user's path literally.
            self._scan_path = self._plain.link(self.path, "input" + self.path.suffix.lower())
            if self.format == "parquet":
                with self.path.open("rb") as f:  # a file object: pyarrow would parse a path as a URI
                    self.arrow_schema = pq.read_schema(f)
            if self.format == "csv":
                self._dialect = _sniff_csv(self._scan_path, self.path, self._con)
            # Binding the query only sniffs a sample (JSON) or reads the footer (Parquet).
            rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
            if self.format in ("json", "jsonl"):
                self._json_columns = _exact_json_columns(self._con, self._read_json, rel)
                if self._json_columns is not None:
                    rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
            self.columns = tuple(Column(name, str(typ)) for name, typ in zip(rel.columns, rel.types))
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            self.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else self._reason(exc)
            raise InputError(f"Cannot read {self.path}: {reason}") from exc
        except BaseException:
            self.close()
            raise
        if ROW_ID in self.column_names:
            self.close()
            raise UsageError(f"Input column {ROW_ID!r} is reserved by batchllm; rename it.")

    def _reason(self, exc: BaseException) -> str:
        """DuckDB's one line, naming the user's file instead of the private link DuckDB opened."""
        link = getattr(self, "_scan_path", None)
        line = _one_line(exc)
        return line.replace(link, str(self.path)) if link else line

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column_type(self, name: str) -> str:
        return next(c.type for c in self.columns if c.name == name)

    def _read_json(self, columns: str | None = None) -> str:
        fmt = "newline_delimited" if self.format == "jsonl" else "auto"
        cols = f", columns={{{columns}}}" if columns else ""
        return f"read_json({_literal(self._scan_path)}, format = {_literal(fmt)}{cols})"

    def file_column_names(self) -> list[str]:
        """The column names as the file spells them, before DuckDB makes duplicates unique (`Text,text`
        reads as `Text`, `text_1`): what column_names.check_input_names needs to see a collision.
        JSON keys (in no particular order) come from the first JSON_KEY_SAMPLE records, the sample
        DuckDB's schema comes from; the file is named exactly as in scan_sql."""
        if self.empty:
            return []
        if self.format == "csv":
            assert self._dialect is not None
            return next(csv.reader(io.StringIO(_csv_header_line(self.path)), delimiter=self._dialect.delimiter), [])
        if self.format == "parquet":
            assert self.arrow_schema is not None
            return list(self.arrow_schema.names)
        fmt = "newline_delimited" if self.format == "jsonl" else "auto"
        cur = self._con.cursor()
        try:
            rows = cur.execute(
                f"SELECT DISTINCT k FROM (SELECT unnest(json_keys(json)) AS k FROM (SELECT json FROM "
                f"read_json_objects({_literal(self._scan_path)}, format={_literal(fmt)}) LIMIT {JSON_KEY_SAMPLE}))"
            ).fetchall()
        except duckdb.Error:
            return self.column_names  # the strict read reports what is wrong with the file
        finally:
            cur.close()
        return [r[0] for r in rows]

    def scan_sql(self, *, rejects_table: str | None = None) -> str:
        """The DuckDB table function that reads the file (no row id, no limit)."""
        if self.format == "csv":
            d = self._dialect
            assert d is not None
            cols = ", ".join(f"{_literal(name)}: 'VARCHAR'" for name in d.names)
            opts = _csv_options(d.delimiter) + [
                "auto_detect=false",
                f"columns={{{cols}}}",
                "strict_mode=false, new_line='\\r\\n'" if d.crlf_quoted_header else "strict_mode=true",
                "allow_quoted_nulls=false",  # "" is an empty string; only an empty field is NULL
            ]
            if self.skip_bad_rows:
                # Every read rejects through store_rejects, never ignore_errors: the two recover from
                # a bad quote differently, and the rows streamed must be the rows counted.
                table = rejects_table or f"batchllm_rejects_{uuid.uuid4().hex[:12]}"
                opts += ["store_rejects=true", f"rejects_table={_literal(table)}",
                         f"rejects_scan={_literal(table + '_scan')}"]
            return f"read_csv({_literal(self._scan_path)}, {', '.join(opts)})"
        if self.format == "parquet":
            return f"read_parquet({_literal(self._scan_path)})"
        cols = self._json_columns
        return self._read_json(", ".join(f"{_literal(c.name)}: {_literal(c.type)}" for c in cols) if cols else None)

    def _limited_sql(self, **kw: str | None) -> str:
        inner = f"SELECT * FROM {self.scan_sql(**kw)}"  # type: ignore[arg-type]
        if self.limit is not None:
            inner += f" LIMIT {int(self.limit)}"
        return inner

    def numbered_sql(self) -> str:
        """A subquery with the row id first, then every input column, in file order.

        row_number() OVER () is a streaming window in DuckDB that numbers rows in scan order (which
        preserve_insertion_order keeps equal to file order, even with parallel CSV reading); the limit
        sits inside so only the first N rows are read at all.
        """
        if self.empty:
            return f"(SELECT 0::BIGINT AS {_ident(ROW_ID)} WHERE false)"
        return f"(SELECT row_number() OVER () - 1 AS {_ident(ROW_ID)}, * FROM ({self._limited_sql()}))"

    def validate(self) -> int:
        """Read every row once (so a malformed file fails now, naming the line) and count the rows.

        With skip_bad_rows the rejected records are kept in `self.rejects`, one per record (see
        `_one_per_record`), and more than `max_rejects` of them is an InputError.
        """
        if self._rows is not None:
            return self._rows
        if self.empty:
            self._rows = 0
            return 0
        con = _connect(self._plain)
        table = f"batchllm_rejects_{uuid.uuid4().hex[:8]}"
        try:
            # count(col) for every column makes DuckDB parse and convert every value (count(*) alone
            # can skip them), so a bad value later in the file is found now.
            counts = ", ".join(f"count({_ident(c.name)})" for c in self.columns)
            rejects_table = table if self.skip_bad_rows else None
            rows = con.execute(
                f"SELECT count(*), {counts} FROM ({self._limited_sql(rejects_table=rejects_table)})"
            ).fetchall()
            self._rows = int(rows[0][0]) if rows else 0
            if self.format == "csv" and not self.skip_bad_rows:
                self._check_record_count(self._rows)
            if self.skip_bad_rows:
                # One entry per rejected line (DuckDB may list several errors for one line).
                self.rejects = _one_per_record(con.sql(
                    f"SELECT line, arg_min(error_type, column_idx) AS error_type, "
                    f"arg_min(error_message, column_idx) AS error, arg_min(csv_line, column_idx) AS csv_line "
                    f"FROM {table} GROUP BY line ORDER BY line"
                ).to_arrow_table())
        except duckdb.Error as exc:
            hint = " Fix the file, or pass --skip-bad-rows to reject bad lines." if self.format == "csv" else ""
            raise InputError(f"Cannot read {self.path}: {self._reason(exc).rstrip('.')}.{hint}") from exc
        finally:
            con.close()
        rejected = self.rejects.num_rows if self.rejects is not None else 0
        if rejected > self.max_rejects:
            assert self.rejects is not None
            first = self.rejects.slice(0, 1).to_pylist()[0]
            raise InputError(
                f"Cannot read {self.path}: {rejected} malformed records, more than --max-rejects "
                f"{self.max_rejects} (the first on line {first['line']}: {first['error']}); fix the file, "
                "or raise --max-rejects if skipping them is right."
            )
        return self._rows

    def _check_record_count(self, rows: int) -> None:
        """InputError unless DuckDB read as many rows as an independent reader counts records: DuckDB
        has read some valid files (a quoted line break in a CRLF header) as 0 rows without an error."""
        if self.limit is not None and rows >= self.limit:
            return
        d = self._dialect
        assert d is not None
        records = _csv_records(self.path, d.delimiter, len(d.names) == 1)
        if records is not None and records != rows:
            raise InputError(
                f"Cannot read {self.path}: it has {records} records but only {rows} were read; the file's "
                "layout (line endings, quoted line breaks) is not read reliably. Save it with plain '\\n' "
                "line endings, or convert it to Parquet or JSON lines."
            )

    def count_rows(self) -> int:
        return self.validate()

    def check_id_column(self, name: str) -> None:
        """UsageError unless `name` is a scalar column with no nulls and no duplicate values."""
        if name not in self.column_names:
            available = ", ".join(self.column_names) or "(none)"
            raise UsageError(f"--id-column {name!r} is not a column of the input; available columns: {available}.")
        typ = self.column_type(name)
        if any(mark in typ.upper() for mark in _SCALAR_ID_TYPES):
            raise UsageError(f"--id-column {name!r} has type {typ}; row ids must be plain values (text or numbers).")
        col = _ident(name)
        cur = self._con.cursor()
        try:
            nulls, dups = cur.execute(
                f"SELECT count(*) - count({col}), count({col}) - count(DISTINCT {col}) FROM ({self._limited_sql()})"
            ).fetchall()[0]
            examples: list[object] = []
            if dups:
                examples = [
                    r[0]
                    for r in cur.execute(
                        f"SELECT {col} FROM ({self._limited_sql()}) WHERE {col} IS NOT NULL "
                        f"GROUP BY {col} HAVING count(*) > 1 ORDER BY {col} LIMIT 3"
                    ).fetchall()
                ]
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {self.path}: {self._reason(exc)}") from exc
        finally:
            cur.close()
        if nulls:
            raise UsageError(f"--id-column {name!r} is null in {nulls} row(s); row ids must be unique and not null.")
        if dups:
            shown = ", ".join(repr(v) for v in examples)
            raise UsageError(
                f"--id-column {name!r} has {dups} duplicate value(s) (e.g. {shown}); row ids must be unique."
            )

    def batches(self, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `batch_size` rows: the row id column, then the input columns."""
        if self.empty:
            return
        # The reader owns its cursor while it streams, so the source can still count or describe.
        cur = self._con.cursor()
        streamed = 0
        try:
            reader = cur.sql(f"SELECT * FROM {self.numbered_sql()}").to_arrow_reader(batch_size)
            for batch in reader:
                if batch.num_rows:
                    streamed += batch.num_rows
                    yield batch
        except duckdb.Error as exc:
            # Typically a JSON value that does not fit the type sniffed from the first rows.
            raise InputError(f"Cannot read {self.path}: {self._reason(exc)}") from exc
        finally:
            cur.close()
        if self._rows is not None and streamed != self._rows:
            # Row ids are positions: a second read that differs would attach answers to other rows.
            raise InputError(
                f"Cannot read {self.path}: it has {streamed} rows now but had {self._rows} when checked; "
                "was it changed during the run? Run the same command again."
            )

    def close(self) -> None:
        self._con.close()
        self._plain.close()

    def __enter__(self) -> TableSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str]) -> Path:
    """Refuse an output that cannot be written, before any model loads; creates nothing."""
    out = Path(output)
    output_format(out)
    inp = Path(input_path)
    same = out.resolve() == inp.resolve()
    if not same and out.exists() and inp.exists():
        same = os.path.samefile(out, inp)
    if same:
        raise UsageError(f"Output {out} is the input file; write the results to a new file.")
    if out.is_dir():
        raise UsageError(f"Output {out} is a directory; give a file name such as {out / 'out.parquet'}.")
    if out.exists() and not out.is_file():
        raise UsageError(f"Output {out} exists and is not a regular file (a pipe or device); give a file name.")
    check_writable_dir(out.parent if str(out.parent) else Path("."), "Output directory")
    return out


def _json_safe(expr: str, typ: duckdb.DuckDBPyType, depth: int = 0) -> str | None:
    """`expr` with every float in it (nested too) as JSON that is valid: NaN/Infinity/-Infinity become
    the strings "NaN", "Infinity", "-Infinity"; None when `typ` holds no float (nothing to change)."""
    if typ.id in ("float", "double"):
        return (
            f"CASE WHEN {expr} IS NULL THEN NULL WHEN isfinite({expr}) THEN to_json({expr}) "
            f"""WHEN isnan({expr}) THEN '"NaN"'::JSON WHEN {expr} > 0 THEN '"Infinity"'::JSON """
            f"""ELSE '"-Infinity"'::JSON END"""
        )
    if typ.id in ("list", "array"):
        var = f"x{depth}"
        inner = _json_safe(var, typ.children[0][1], depth + 1)
        return None if inner is None else f"list_transform({expr}, lambda {var}: {inner})"
    if typ.id == "struct":
        fields = [(n, _json_safe(f"struct_extract({expr}, {_literal(n)})", t, depth + 1)) for n, t in typ.children]
        if all(f is None for _, f in fields):
            return None
        packed = ", ".join(
            f"{_ident(n)} := {f if f is not None else f'struct_extract({expr}, {_literal(n)})'}" for n, f in fields
        )
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE struct_pack({packed}) END"
    if typ.id == "map":
        var = f"x{depth}"
        value = _json_safe(f"{var}.value", typ.children[1][1], depth + 1)
        if value is None:
            return None
        return f"map_from_entries(list_transform(map_entries({expr}), lambda {var}: struct_pack(k := {var}.key, v := {value})))"
    return None


def _json_safe_query(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """`query` with its non-finite floats as valid JSON strings (DuckDB would write bare NaN)."""
    rel = con.sql(f"SELECT * FROM ({query}) LIMIT 0")
    exprs = [(_json_safe(f"q.{_ident(n)}", t), n) for n, t in zip(rel.columns, rel.types)]
    if all(e is None for e, _ in exprs):
        return query
    picked = ", ".join(f"{e if e is not None else f'q.{_ident(n)}'} AS {_ident(n)}" for e, n in exprs)
    return f"SELECT {picked} FROM ({query}) AS q"


def _same_values(original: pa.DataType, read: pa.DataType) -> bool:
    """Whether `read` (DuckDB's Arrow type for a column) holds the same values as `original` (the input
    file's), so that casting back only restores the representation: a time zone, a dictionary, large or
    view strings, list field names. Anything else keeps DuckDB's type rather than risk a failed cast."""
    if original == read:
        return True
    if pa.types.is_dictionary(original):
        return _same_values(original.value_type, read)
    if pa.types.is_timestamp(original) and pa.types.is_timestamp(read):
        return original.unit == read.unit and (original.tz is None) == (read.tz is None)
    texts = (pa.string(), pa.large_string(), pa.string_view())
    blobs = (pa.binary(), pa.large_binary(), pa.binary_view())
    if (original in texts and read in texts) or (original in blobs and read in blobs):
        return True
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(f(original) for f in lists) and any(f(read) for f in lists):
        return _same_values(original.value_type, read.value_type)
    if pa.types.is_struct(original) and pa.types.is_struct(read):
        return [f.name for f in original] == [f.name for f in read] and all(
            _same_values(a.type, b.type) for a, b in zip(original, read)
        )
    if pa.types.is_map(original) and pa.types.is_map(read):
        return _same_values(original.key_type, read.key_type) and _same_values(original.item_type, read.item_type)
    return False


def _restored_schema(got: pa.Schema, keep: pa.Schema | None) -> pa.Schema | None:
    """`got` (DuckDB's Arrow schema of the output) with the input's own types put back where only their
    representation differs; None when nothing needs putting back."""
    if keep is None:
        return None
    fields = []
    for f in got:
        own = keep.field(f.name) if f.name in keep.names else None
        fields.append(own if own is not None and own.type != f.type and _same_values(own.type, f.type) else f)
    return pa.schema(fields) if any(a is not b for a, b in zip(fields, got)) else None


def _write_parquet(con: duckdb.DuckDBPyConnection, query: str, tmp: Path, keep: pa.Schema | None) -> None:
    """DuckDB's COPY (parallel), or, when the input has types it would not write back (time zones are
    written as UTC, dictionaries as plain strings), through Arrow with those types restored. HUGEINT,
    which Parquet cannot hold and COPY would write as a double, goes as DECIMAL(38,0)."""
    rel = con.sql(f"SELECT * FROM ({query}) LIMIT 0")
    schema = _restored_schema(rel.to_arrow_table().schema, keep)
    if schema is not None:  # DuckDB's Arrow export gives HUGEINT as decimal128(38, 0) already
        reader = con.sql(query).to_arrow_reader(_PARQUET_BATCH_ROWS)
        with tmp.open("wb") as f, pq.ParquetWriter(f, schema, compression="snappy") as writer:
            for batch in reader:
                writer.write_batch(batch.cast(schema))
        return
    cols = [
        f"q.{_ident(n)}::DECIMAL(38,0) AS {_ident(n)}" if t.id in ("hugeint", "uhugeint") else f"q.{_ident(n)}"
        for n, t in zip(rel.columns, rel.types)
    ]
    with PlainPaths() as plain:
        target = plain.link(tmp, "output.parquet")
        con.execute(
            f"COPY (SELECT {', '.join(cols)} FROM ({query}) AS q) TO {_literal(target)} ({_COPY_OPTIONS['parquet']})"
        )


def _copy_atomically(
    con: duckdb.DuckDBPyConnection,
    query: str,
    out: Path,
    fmt: str,
    after_write: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
    keep_types: pa.Schema | None = None,
) -> None:
    """COPY `query` to a temporary file beside `out`, fsync, rename into place, fsync the directory.

    The temporary file is created here (O_EXCL: it is ours) and DuckDB writes into it through a plain
    link, so neither name is ever read as a pattern.
    """
    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        if fmt == "parquet":
            _write_parquet(con, query, tmp, keep_types)
        else:
            if fmt == "json":
                query = _json_safe_query(con, query)
            with PlainPaths() as plain:
                target = plain.link(tmp, f"output.{fmt}")
                con.execute(f"COPY ({query}) TO {_literal(target)} ({_COPY_OPTIONS[fmt]})")
        fsync_file(tmp)
        if after_write:
            after_write()
        os.replace(tmp, out)
        fsync_dir(out.parent if str(out.parent) else Path("."))
    except (duckdb.Error, OSError, pa.ArrowException) as exc:
        raise _write_error(out, exc) from exc
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    if after_rename:
        after_rename()


def _results_relation(
    con: duckdb.DuckDBPyConnection, results: pa.Table | Sequence[Path], plain: PlainPaths
) -> str:
    if isinstance(results, pa.Table):
        con.register("batchllm_results", results)
        return "batchllm_results"
    # Shards are read through plain links too: the run directory's path may hold pattern characters.
    files = ", ".join(_literal(plain.link(p, f"shard-{i}.parquet")) for i, p in enumerate(results))
    return f"read_parquet([{files}])"


def write_output(
    source: TableSource,
    results: pa.Table | Sequence[Path],
    output: str | os.PathLike[str],
    *,
    columns: Sequence[tuple[str, str]] | None = None,
    after_write: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
) -> Path:
    """Write input columns (unchanged, in order) + result columns, rows in input order, atomically.

    `results` (an Arrow table, or Parquet files holding one between them) has the ROW_ID column plus
    the new columns; `columns` picks and renames them as (result column, output name) pairs (default:
    every result column under its own name). Input rows without a result get nulls.
    """
    out = Path(output)
    fmt = output_format(out)
    plain = PlainPaths()
    con = _connect(plain)
    try:
        rel = _results_relation(con, results, plain)
        names = [n for n in con.sql(f"SELECT * FROM {rel} LIMIT 0").columns]
        if ROW_ID not in names:
            raise ValueError(f"results need a {ROW_ID} column")
        pairs = list(columns) if columns is not None else [(n, n) for n in names if n != ROW_ID]
        clash = set(source.column_names) & {new for _, new in pairs}
        if clash:
            raise UsageError(f"Output column(s) {sorted(clash)} already exist in the input; use --column.")
        rid = _ident(ROW_ID)
        picked = ", ".join(f"res.{_ident(old)} AS {_ident(new)}" for old, new in pairs)
        src_cols = "src.* EXCLUDE (" + rid + "), " if source.column_names else ""
        query = (
            f"SELECT {src_cols}{picked} "
            f"FROM {source.numbered_sql()} AS src LEFT JOIN {rel} AS res "
            f"ON src.{rid} = res.{rid} ORDER BY src.{rid}"
        )
        if source.empty:  # no input columns at all: just the (empty, typed) result columns
            query = f"SELECT {picked} FROM {rel} AS res WHERE false"
        _copy_atomically(con, query, out, fmt, after_write, after_rename, keep_types=source.arrow_schema)
    except duckdb.Error as exc:
        raise _write_error(out, exc) from exc
    finally:
        con.close()
        plain.close()
    return out


def write_query_jsonl(
    query_for: Callable[[str, str], str],
    source: TableSource,
    results: pa.Table | Sequence[Path],
    out: Path,
) -> None:
    """Write `query_for(numbered input subquery, results relation)` to `out` as JSON lines, atomically."""
    plain = PlainPaths()
    con = _connect(plain)
    try:
        rel = _results_relation(con, results, plain)
        _copy_atomically(con, query_for(source.numbered_sql(), rel), out, "json")
    except duckdb.Error as exc:
        raise _write_error(out, exc) from exc
    finally:
        con.close()
        plain.close()


def write_table_jsonl(table: pa.Table, out: Path) -> None:
    """An Arrow table as JSON lines, written atomically."""
    plain = PlainPaths()
    con = _connect(plain)
    try:
        con.register("batchllm_table", table)
        _copy_atomically(con, "SELECT * FROM batchllm_table", out, "json")
    finally:
        con.close()
        plain.close()


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """The whole table in file order (for tests, small outputs and library users)."""
    with TableSource(path) as src:
        if src.empty:
            return pa.table({})
        try:
            return src._con.sql(f"SELECT * FROM {src.scan_sql()}").to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {path}: {_one_line(exc)}") from exc
