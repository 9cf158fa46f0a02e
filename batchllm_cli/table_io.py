"""All table reading and writing: the one module that talks to DuckDB.

Input rows are streamed as Arrow record batches with an explicit ordinal row id, so the rest of the CLI
never depends on DuckDB's ordering rules; the output is a DuckDB join of the input (read a second time)
with the result columns on that row id, written to a temporary file and renamed into place.

CSV input is read strictly (RFC 4180 quoting with `"`, the delimiter taken from the header line, types
sniffed from a sample) so that a malformed file fails with DuckDB's error naming the line instead of
being silently read with another dialect; `skip_bad_rows` rejects such lines instead and keeps them
(line number, error type, text) for a rejects file.
"""
from __future__ import annotations

import csv
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, Sequence

import duckdb
import pyarrow as pa

from batchllm_cli.durable import fsync_dir, fsync_file, is_disk_full, temp_name
from batchllm_cli.errors import InputError, OutputError, TempFailError, UsageError

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
_COPY_OPTIONS = {"parquet": "FORMAT parquet", "csv": "FORMAT csv, HEADER true", "json": "FORMAT json"}

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


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
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


def _csv_header_line(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(1 << 20)
    text = head.decode("utf-8-sig", errors="replace")
    # The header ends at the first newline outside quotes.
    in_quotes = False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return text[:i]
    return text


def _csv_delimiter(header: str) -> str:
    """The candidate that splits the header line most often (outside quotes); ',' when none does."""
    counts = dict.fromkeys(_CSV_DELIMITERS, 0)
    in_quotes = False
    for ch in header:
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch in counts:
            counts[ch] += 1
    best = max(_CSV_DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


@dataclass(frozen=True)
class CsvDialect:
    delimiter: str
    columns: tuple[Column, ...]
    date_format: str | None = None
    timestamp_format: str | None = None


def _sniff_csv(path: Path, con: duckdb.DuckDBPyConnection) -> CsvDialect:
    header = _csv_header_line(path)
    delim = _csv_delimiter(header)
    base = (
        f"{_literal(str(path))}, delim={_literal(delim)}, quote='\"', escape='\"', header=true, "
        f"max_line_size={CSV_MAX_LINE_SIZE}"
    )
    try:
        # ignore_errors: the types come from the rows that parse; the strict read names the bad ones.
        rows = con.execute(
            f"SELECT Columns, DateFormat, TimestampFormat FROM sniff_csv({base}, ignore_errors=true)"
        ).fetchall()
        row = rows[0] if rows else None
    except duckdb.Error:
        row = None
    if row is not None and row[0]:
        cols = tuple(Column(c["name"], c["type"]) for c in row[0])
        return CsvDialect(delim, cols, row[1] or None, row[2] or None)
    # The sniffer gives up on some broken files (an unterminated quote in the sample): take the names
    # from the header and read every column as text, so the strict read reports the bad line.
    names = next(csv.reader(io.StringIO(header), delimiter=delim), []) or ["column0"]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        unique.append(name)
    return CsvDialect(delim, tuple(Column(n, "VARCHAR") for n in unique))


class TableSource:
    """An input table: its columns (known without reading the data) and its rows as Arrow batches.

    `limit` keeps only the first N rows everywhere (stream, count and output join), so a --limit run
    is a consistent prefix of the table. `skip_bad_rows` (CSV only) drops malformed lines instead of
    failing; `validate()` reads the whole table once, counts the rows and collects the rejected lines.
    A blank file (0 bytes or only whitespace) is an empty table with no columns.
    """

    def __init__(
        self, path: str | os.PathLike[str], limit: int | None = None, *, skip_bad_rows: bool = False
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"Input file not found: {self.path}")
        if not self.path.is_file():
            raise UsageError(f"Input is not a file: {self.path}")
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 or more.")
        self.format = input_format(self.path)
        if skip_bad_rows and self.format != "csv":
            raise UsageError(f"--skip-bad-rows applies to CSV input only; {self.path} is {self.format}.")
        self.limit = limit
        self.skip_bad_rows = skip_bad_rows
        self.empty = self.format != "parquet" and _is_blank_file(self.path)
        self._rows: int | None = None
        self.rejects: pa.Table | None = None  # line, error_type, error, csv_line (after validate())
        self._dialect: CsvDialect | None = None
        self._con = _connect()
        if self.empty:
            self.columns: tuple[Column, ...] = ()
            return
        try:
            if self.format == "csv":
                self._dialect = _sniff_csv(self.path, self._con)
            # Binding the query only sniffs a sample (JSON) or reads the footer (Parquet).
            rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
            self.columns = tuple(Column(name, str(typ)) for name, typ in zip(rel.columns, rel.types))
        except duckdb.Error as exc:
            self._con.close()
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}") from exc
        if ROW_ID in self.column_names:
            self._con.close()
            raise UsageError(f"Input column {ROW_ID!r} is reserved by batchllm; rename it.")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column_type(self, name: str) -> str:
        return next(c.type for c in self.columns if c.name == name)

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
            import pyarrow.parquet as pq

            return list(pq.read_schema(self.path).names)
        fmt = "newline_delimited" if self.format == "jsonl" else "auto"
        cur = self._con.cursor()
        try:
            rows = cur.execute(
                f"SELECT DISTINCT k FROM (SELECT unnest(json_keys(json)) AS k FROM (SELECT json FROM "
                f"read_json_objects({_literal(str(self.path))}, format={_literal(fmt)}) LIMIT {JSON_KEY_SAMPLE}))"
            ).fetchall()
        except duckdb.Error:
            return self.column_names  # the strict read reports what is wrong with the file
        finally:
            cur.close()
        return [r[0] for r in rows]

    def scan_sql(self, *, rejects_table: str | None = None) -> str:
        """The DuckDB table function that reads the file (no row id, no limit)."""
        path = _literal(str(self.path))
        if self.format == "csv":
            d = self._dialect
            assert d is not None
            cols = ", ".join(f"{_literal(c.name)}: {_literal(c.type)}" for c in d.columns)
            opts = [
                f"delim={_literal(d.delimiter)}",
                "quote='\"'",
                "escape='\"'",
                "header=true",
                "auto_detect=false",
                f"columns={{{cols}}}",
                "strict_mode=true",
                "allow_quoted_nulls=false",  # "" is an empty string; only an empty field is NULL
                f"max_line_size={CSV_MAX_LINE_SIZE}",
            ]
            if d.date_format:
                opts.append(f"dateformat={_literal(d.date_format)}")
            if d.timestamp_format:
                opts.append(f"timestampformat={_literal(d.timestamp_format)}")
            if self.skip_bad_rows:
                if rejects_table:
                    opts += ["store_rejects=true", f"rejects_table={_literal(rejects_table)}",
                             f"rejects_scan={_literal(rejects_table + '_scan')}"]
                else:
                    opts.append("ignore_errors=true")
            return f"read_csv({path}, {', '.join(opts)})"
        if self.format == "parquet":
            return f"read_parquet({path})"
        if self.format == "jsonl":
            return f"read_json({path}, format = 'newline_delimited')"
        return f"read_json({path}, format = 'auto')"

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

        With skip_bad_rows the rejected lines are kept in `self.rejects`, one per line.
        """
        if self._rows is not None:
            return self._rows
        if self.empty:
            self._rows = 0
            return 0
        con = _connect()
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
            if self.skip_bad_rows:
                # One entry per rejected line (DuckDB may list several errors for one line).
                self.rejects = con.sql(
                    f"SELECT line, arg_min(error_type, column_idx) AS error_type, "
                    f"arg_min(error_message, column_idx) AS error, arg_min(csv_line, column_idx) AS csv_line "
                    f"FROM {table} GROUP BY line ORDER BY line"
                ).to_arrow_table()
        except duckdb.Error as exc:
            hint = " Fix the file, or pass --skip-bad-rows to reject bad lines." if self.format == "csv" else ""
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}.{hint}") from exc
        finally:
            con.close()
        return self._rows

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
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}") from exc
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
        try:
            reader = cur.sql(f"SELECT * FROM {self.numbered_sql()}").to_arrow_reader(batch_size)
            for batch in reader:
                if batch.num_rows:
                    yield batch
        except duckdb.Error as exc:
            # Typically a value that does not fit the type sniffed from the first rows of a CSV/JSON.
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}") from exc
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> TableSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str]) -> Path:
    """Refuse an output that cannot be written, before any model loads; creates missing parent dirs."""
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
    check_writable_dir(out.parent if str(out.parent) else Path("."), "Output directory")
    return out


def check_writable_dir(directory: Path, what: str) -> None:
    """Create `directory` if needed and prove a file can be created in it (root ignores mode bits,
    so only a real write tells a read-only mount apart)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".batchllm.{uuid.uuid4().hex}.probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{what} {directory} is not writable: {exc.strerror or exc}.") from exc


def _copy_atomically(
    con: duckdb.DuckDBPyConnection,
    query: str,
    out: Path,
    fmt: str,
    after_write: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
) -> None:
    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY ({query}) TO {_literal(str(tmp))} ({_COPY_OPTIONS[fmt]})")
        fsync_file(tmp)
        if after_write:
            after_write()
        os.replace(tmp, out)
        fsync_dir(out.parent if str(out.parent) else Path("."))
    except (duckdb.Error, OSError) as exc:
        raise _write_error(out, exc) from exc
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    if after_rename:
        after_rename()


def _results_relation(con: duckdb.DuckDBPyConnection, results: pa.Table | Sequence[Path]) -> str:
    if isinstance(results, pa.Table):
        con.register("batchllm_results", results)
        return "batchllm_results"
    files = ", ".join(_literal(str(p)) for p in results)
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
    con = _connect()
    try:
        rel = _results_relation(con, results)
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
        _copy_atomically(con, query, out, fmt, after_write, after_rename)
    except duckdb.Error as exc:
        raise _write_error(out, exc) from exc
    finally:
        con.close()
    return out


def write_query_jsonl(
    query_for: Callable[[str, str], str],
    source: TableSource,
    results: pa.Table | Sequence[Path],
    out: Path,
) -> None:
    """Write `query_for(numbered input subquery, results relation)` to `out` as JSON lines, atomically."""
    con = _connect()
    try:
        rel = _results_relation(con, results)
        _copy_atomically(con, query_for(source.numbered_sql(), rel), out, "json")
    except duckdb.Error as exc:
        raise _write_error(out, exc) from exc
    finally:
        con.close()


def write_table_jsonl(table: pa.Table, out: Path) -> None:
    """An Arrow table as JSON lines, written atomically."""
    con = _connect()
    try:
        con.register("batchllm_table", table)
        _copy_atomically(con, "SELECT * FROM batchllm_table", out, "json")
    finally:
        con.close()


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """The whole table in file order (for tests, small outputs and library users)."""
    with TableSource(path) as src:
        if src.empty:
            return pa.table({})
        try:
            return src._con.sql(f"SELECT * FROM {src.scan_sql()}").to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {path}: {_one_line(exc)}") from exc
