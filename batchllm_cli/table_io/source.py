"""TableSource: an input table's columns and its rows as Arrow batches, in file order."""
from __future__ import annotations

import csv
import io
import os
import stat
import uuid
from pathlib import Path
from types import TracebackType
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm_cli.durable import check_writable_dir
from batchllm_cli.errors import InputError, UsageError
from batchllm_cli.plain_paths import PlainPaths
from batchllm_cli.table_io.common import (
    DEFAULT_MAX_REJECTS, JSON_KEY_SAMPLE, ROW_ID, _SCALAR_ID_TYPES, Column, _connect, _ident, _literal,
    _is_blank_file, _one_line, input_format, output_format,
)
from batchllm_cli.table_io.csv_dialect import (
    CsvDialect, _csv_bad_record, _csv_header_line, _csv_options, _csv_records, _one_per_record, _sniff_csv,
)
from batchllm_cli.table_io.json_types import _exact_json_columns


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
            if self.format == "csv":
                self._check_lenient_read()
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

    def _check_lenient_read(self) -> None:
        """A file DuckDB can only read in its lenient mode (a CRLF file whose header holds a quoted line
        break), which pads, cuts or merges malformed records silently, is checked record by record here."""
        d = self._dialect
        assert d is not None
        if not d.crlf_quoted_header:
            return
        bad = _csv_bad_record(self.path, d.delimiter, len(d.names))
        if bad is not None:
            raise InputError(
                f"Cannot read {self.path}: {bad}. Fix the file (--skip-bad-rows cannot skip records in a "
                "CRLF file whose header holds a line break)."
            )

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


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """The whole table in file order (for tests, small outputs and library users)."""
    with TableSource(path) as src:
        if src.empty:
            return pa.table({})
        try:
            return src._con.sql(f"SELECT * FROM {src.scan_sql()}").to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {path}: {_one_line(exc)}") from exc
