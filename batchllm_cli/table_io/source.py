"""TableSource: an input table's columns and its rows as Arrow batches, in file order."""
from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa

from batchllm_cli.errors import InputError, UsageError
from batchllm_cli.plain_paths import PlainPaths, temp_full_error, temp_writes
from batchllm_cli.table_io.arrow_types import cast_batch, zoned_schema
from batchllm_cli.table_io.common import (
    DEFAULT_MAX_REJECTS, JSON_MAX_RECORD_SIZE, ROW_ID, _SCALAR_ID_TYPES, Column, _connect, _ident, _literal,
    _one_line,
)
from batchllm_cli.table_io.csv_dialect import CsvDialect, CsvText, _csv_header_line, _csv_options
from batchllm_cli.table_io.inputs import (
    DUCKDB_ENCODINGS, InputFile, InputOptions, ResolvedInput, check_csv_content, gzip_read_errors, input_args, is_blank, is_url, python_encoding, resolve_input,
    transcode,
)
from batchllm_cli.table_io.file_set import (
    FILE_COLUMN, check_json_files, check_partition_keys, csv_dialect, load_httpfs, parquet_schema, with_partitions,
)
from batchllm_cli.table_io.json_types import Decoder, _exact_json_columns, nested_json_decoder
from batchllm_cli.table_io.selection import checked_where, selected_columns
from batchllm_cli.table_io.validation import ValidatedRead


class TableSource(ValidatedRead):
    """An input table: its columns (known without reading the data) and its rows as Arrow batches.

    `path` is INPUT (inputs.py: one or several files, a directory, a pattern, `-`, a URL); `options`
    say how to read it, including --where and --columns, which apply before anything else sees a row:
    row ids number the rows that pass --where (from 0), and `limit` keeps only the first N of them
    everywhere (stream, count and output join), so a --limit run is a consistent prefix of the table.
    `skip_bad_rows` (CSV only) drops malformed lines instead of failing; `validate()` reads the whole
    table once, counts the rows and collects the rejected lines. Blank files (0 bytes or only
    whitespace) hold no rows; an input of only blank files is an empty table with no columns.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        limit: int | None = None,
        *,
        skip_bad_rows: bool = False,
        max_rejects: int = DEFAULT_MAX_REJECTS,
        options: InputOptions = InputOptions(),
    ) -> None:
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 or more.")
        if max_rejects < 0:
            raise UsageError("--max-rejects must be 0 or more.")
        self.options = options
        self.limit = limit
        self.skip_bad_rows = skip_bad_rows
        self.max_rejects = max_rejects
        self._rows: int | None = None
        self.rejects: pa.Table | None = None  # line, error_type, error, csv_line (after validate())
        self._dialect: CsvDialect | None = None
        self._json_columns: tuple[Column, ...] | None = None
        self._where: str | None = None  # --where, parsed
        self._table_columns: tuple[Column, ...] = ()  # every column, before --columns
        self._links: dict[str, str] = {}  # the plain name DuckDB opens -> the user's name for it
        self.arrow_schema: pa.Schema | None = None  # a Parquet input's own types, kept in Parquet output
        self._arg = path
        self._plain = PlainPaths()
        self._con = _connect(self._plain)
        try:
            with temp_writes(self._plain.directory()):  # stdin's copy and transcoded inputs go there
                self.input: ResolvedInput = resolve_input(path, options, self._plain.private_file("stdin.data"))
                self.path = self.input.label  # how messages name the input
                self.format = self.input.format
                self._open_files()
        except BaseException:
            self.close()
            raise
        self.empty = not self.files
        if self.empty:
            self.columns: tuple[Column, ...] = ()
            return
        try:
            self.columns = self._read_columns()
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            self.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else self._reason(exc)
            raise temp_full_error(exc) or InputError(f"Cannot read {self.path}: {reason}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def is_csv(self) -> bool:
        return self.format in ("csv", "tsv")

    def _open_files(self) -> None:
        """Check the flags against the format, decode what DuckDB cannot, drop blank files, link the rest."""
        if self.skip_bad_rows and not self.is_csv:
            raise UsageError(f"--skip-bad-rows applies to CSV input only; {self.path} is {self.format}.")
        if self.options.encoding is not None and not self.is_csv:
            raise UsageError(f"--encoding applies to CSV/TSV input only; {self.path} is {self.format}.")
        encoding = python_encoding(self.options.encoding or "utf-8")
        files = list(self.input.files)
        if self.is_csv and encoding not in DUCKDB_ENCODINGS:
            if any(f.is_url for f in files):
                raise UsageError(f"--encoding {self.options.encoding}: a URL can only be read as "
                                 f"{', '.join(DUCKDB_ENCODINGS.values())}; download the file first.")
            files = [transcode(f, encoding, self._plain.private_file(f"utf8-{i}.csv")) for i, f in enumerate(files)]
            encoding = "utf-8"
        self._duckdb_encoding = DUCKDB_ENCODINGS[encoding]
        self._text_encoding = "utf-8-sig" if encoding == "utf-8" else encoding
        self.files: tuple[InputFile, ...] = tuple(
            f for f in files if self.format == "parquet" or not is_blank(f, json=self.format == "json"))
        self._scan_paths: list[str] = []
        for i, f in enumerate(self.files):
            if f.is_url:
                load_httpfs(self._con, f.name)
                scan = f.location
            else:
                # DuckDB only ever sees this plain name; the kernel resolves the user's path literally.
                ext = {"gzip": ".gz", "zstd": ".zst"}.get(f.compression or "", "")
                scan = self._plain.link(f.path, f"input-{i}.{self.format}{ext}")
            self._links[scan] = f.name
            self._scan_paths.append(scan)

    def _text(self, f: InputFile) -> CsvText:
        return CsvText(self._text_encoding, f.compression)

    def _read_columns(self) -> tuple[Column, ...]:
        """The columns every file agrees on (refused when they differ), then hive partition columns,
        then --columns and --where checked against them."""
        if self.format == "parquet":
            self.arrow_schema = parquet_schema(self._con, self.files, self._scan_paths)
        if self.is_csv:
            for f in self.files:
                check_csv_content(f, self.format, self.options.encoding is not None)
            delimiter = "\t" if self.format == "tsv" else None
            self._dialect = csv_dialect(self._con, self.files, self._scan_paths, self._text, delimiter,
                                        self._duckdb_encoding)
        # Binding the query reads the footer (Parquet) or, for JSON, parses every record to find the
        # schema (see _read_json); the JSON columns found are then given to every later read.
        rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
        if self.format in ("json", "jsonl"):
            check_json_files(self._con, self.files, self._scan_paths, lambda one: self._read_json(paths=[one]))
            own = [(n, t) for n, t in zip(rel.columns, rel.types) if n != FILE_COLUMN]
            self._json_columns = _exact_json_columns(self._con, self._read_json, own)
            rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
        names = [n for n in rel.columns if n != FILE_COLUMN]
        if ROW_ID in names:
            raise UsageError(f"Input column {ROW_ID!r} is reserved by batchllm; rename it.")
        check_partition_keys(self.input.partition_keys, names, self.path)
        table = self._con.sql(f"SELECT * FROM ({self._table_sql()}) LIMIT 0")
        columns = self._table_columns = tuple(Column(n, str(t)) for n, t in zip(table.columns, table.types))
        if self.options.columns is not None:
            columns = selected_columns(columns, self.options.columns)
        if self.options.where is not None:
            self._where = checked_where(self._con, self.options.where, self._table_sql(), self._reason, self.is_csv)
        return columns

    def _reason(self, exc: BaseException) -> str:
        """DuckDB's one line, naming the user's files instead of the private links DuckDB opened."""
        line = _one_line(exc)
        for link, name in getattr(self, "_links", {}).items():
            line = line.replace(link, name)
        return line

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def json_decoders(self) -> dict[str, Decoder]:
        """Column -> the function that turns the JSON texts nested in its values into values (JSON input
        whose list elements or struct fields hold mixed types), for columns that have any."""
        found = {c.name: nested_json_decoder(c.type) for c in self.columns}
        return {name: decode for name, decode in found.items() if decode is not None}

    def column_type(self, name: str) -> str:
        return next(c.type for c in self.columns if c.name == name)

    def _files_sql(self, paths: Sequence[str] | None = None) -> str:
        return "[" + ", ".join(_literal(p) for p in (self._scan_paths if paths is None else paths)) + "]"

    def _file_option(self) -> str:
        return f", filename={_literal(FILE_COLUMN)}" if self.input.partition_keys else ""

    def _read_json(self, columns: str | None = None, *, paths: Sequence[str] | None = None) -> str:
        """read_json of the files (or `paths`), with `columns` as given or else detected from every
        record of every file: DuckDB's default sample (the first 20,480 records of at most 32 files)
        refuses a key or type first seen later, or silently rounds a later 1.5 into an integer
        column and drops a later key of a nested object."""
        fmt = "newline_delimited" if self.format == "jsonl" else "auto"
        cols = f", columns={{{columns}}}" if columns else ", sample_size=-1, maximum_sample_files=-1"
        extra = self._file_option() if paths is None else ""
        size = f", maximum_object_size = {JSON_MAX_RECORD_SIZE}"
        return f"read_json({self._files_sql(paths)}, format = {_literal(fmt)}{cols}{size}{extra})"

    def file_column_names(self) -> list[str]:
        """The column names as the first file spells them, before DuckDB makes duplicates unique
        (`Text,text` reads as `Text`, `text_1`), then the partition keys: what
        column_names.check_input_names needs to see a collision. JSON keys (in no particular order)
        come from every record of the first file, as DuckDB's schema does (every file has its keys)."""
        if self.empty:
            return []
        return self._first_file_names() + list(self.input.partition_keys)

    def _first_file_names(self) -> list[str]:
        first = self.files[0]
        if self.is_csv:
            assert self._dialect is not None
            if first.is_url:
                return list(self._dialect.names)
            with gzip_read_errors(first.name):
                header = _csv_header_line(first.path, self._text(first))
            return next(csv.reader(io.StringIO(header), delimiter=self._dialect.delimiter), [])
        if self.format == "parquet" and self.arrow_schema is not None:
            return list(self.arrow_schema.names)
        if self.format == "parquet":
            return [n for n in self.column_names if n not in self.input.partition_keys]
        fmt = "newline_delimited" if self.format == "jsonl" else "auto"
        cur = self._con.cursor()
        try:
            # in order of first appearance (DISTINCT's order is the hash table's: a test saw "column 2")
            rows = cur.execute(
                f"SELECT k FROM (SELECT k, row_number() OVER () AS n FROM (SELECT unnest(json_keys(json)) AS k "
                f"FROM read_json_objects({_literal(self._scan_paths[0])}, format={_literal(fmt)}))) "
                "GROUP BY k ORDER BY min(n)"
            ).fetchall()
        except duckdb.Error:
            return [n for n in self.column_names if n not in self.input.partition_keys]
        finally:
            cur.close()
        return [r[0] for r in rows]

    def scan_sql(self, *, rejects_table: str | None = None) -> str:
        """The DuckDB table function that reads the files (no row id, no limit; with the file name
        column when hive partitions are attached by _table_sql)."""
        if self.is_csv:
            d = self._dialect
            assert d is not None
            cols = ", ".join(f"{_literal(name)}: 'VARCHAR'" for name in d.names)
            opts = _csv_options(d.delimiter, self._duckdb_encoding) + [
                "auto_detect=false",
                f"columns={{{cols}}}",
                d.read_mode(),
                "allow_quoted_nulls=false",  # "" is an empty string; only an empty field is NULL
            ]
            if self.skip_bad_rows:
                # Every read rejects through store_rejects, never ignore_errors: the two recover from
                # a bad quote differently, and the rows streamed must be the rows counted.
                table = rejects_table or f"batchllm_rejects_{uuid.uuid4().hex[:12]}"
                opts += ["store_rejects=true", f"rejects_table={_literal(table)}",
                         f"rejects_scan={_literal(table + '_scan')}"]
            return f"read_csv({self._files_sql()}, {', '.join(opts)}{self._file_option()})"
        if self.format == "parquet":
            return f"read_parquet({self._files_sql()}{self._file_option()})"
        cols = self._json_columns
        return self._read_json(", ".join(f"{_literal(c.name)}: {_literal(c.type)}" for c in cols) if cols else None)

    def _table_sql(self, **kw: str | None) -> str:
        """Every column of the input: the files' own, then the hive partition values (as text)."""
        return with_partitions(self.scan_sql(**kw), self.input.partition_keys, self.files, self._scan_paths)  # type: ignore[arg-type]

    def _limited_sql(self, **kw: str | None) -> str:
        """The rows jobs see: --where applied, --columns picked, at most `limit` rows."""
        cols = ", ".join(_ident(c.name) for c in self.columns) if self.options.columns is not None else "*"
        inner = f"SELECT {cols} FROM ({self._table_sql(**kw)})"
        if self.options.where is not None:
            inner += f" WHERE ({self._where})"
        if self.limit is not None:
            inner += f" LIMIT {int(self.limit)}"
        return inner

    def numbered_sql(self) -> str:
        """A subquery with the row id first, then every input column, in file order.

        row_number() OVER () is a streaming window in DuckDB that numbers rows in scan order (which
        preserve_insertion_order keeps equal to file order, files in the listed order, even with
        parallel CSV reading); the filter and limit sit inside, so ids count the rows that pass
        --where and only the first N rows are read at all.
        """
        if self.empty:
            return f"(SELECT 0::BIGINT AS {_ident(ROW_ID)} WHERE false)"
        return f"(SELECT row_number() OVER () - 1 AS {_ident(ROW_ID)}, * FROM ({self._limited_sql()}))"

    def count_rows(self) -> int:
        return self.validate()

    def check_id_column(self, name: str) -> None:
        """UsageError unless `name` is a scalar column with no nulls and no duplicate values."""
        if name not in self.column_names:
            if name in (c.name for c in self._table_columns):  # in the file, but --columns left it out
                raise UsageError(f"--id-column {name!r} is left out by --columns; add it there.")
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
            raise temp_full_error(exc) or InputError(f"Cannot read {self.path}: {self._reason(exc)}") from exc
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
            # A time with a zone in its file is given in that zone (DuckDB gives UTC): a template
            # prints it as the file has it, whatever the machine's zone.
            zoned = zoned_schema(reader.schema, self.arrow_schema)
            for batch in reader:
                if batch.num_rows:
                    streamed += batch.num_rows
                    yield batch if zoned is None else cast_batch(batch, zoned)
        except duckdb.Error as exc:
            # Typically a file changed since validate() read it (the JSON types come from every record);
            # or DuckDB's spill files filled the temp directory.
            raise temp_full_error(exc) or InputError(f"Cannot read {self.path}: {self._reason(exc)}") from exc
        finally:
            cur.close()
        if self._rows is not None and streamed != self._rows:
            # Row ids are positions: a second read that differs would attach answers to other rows.
            raise InputError(
                f"Cannot read {self.path}: it has {streamed} rows now but had {self._rows} when checked; "
                "was it changed during the run? Run the same command again."
            )

    @property
    def local_files(self) -> tuple[Path, ...]:
        """The user's local files this input reads (blank ones included; not stdin's spool, not URLs)."""
        if self.input.stdin:
            return ()
        return tuple(f.path for f in self.input.files if not f.is_url)

    def identity(self) -> str:
        """INPUT for the fingerprint: resolved local paths (one file: as before), URLs as given, `-`."""
        if self.input.stdin:
            return "-"
        args = input_args(self._arg)
        return " ".join(a if is_url(a) else os.path.abspath(a) if self.options.glob else str(Path(a).resolve())
                        for a in args)

    def snapshot_files(self, *, relist: bool = False) -> list[Path] | None:
        """The files whose bytes the job reads, stdin's spool included (None when a URL is read);
        `relist` lists a directory or pattern again, to see files added or removed since."""
        if any(f.is_url for f in self.input.files):
            return None
        if relist and not self.input.stdin:
            try:
                return [f.path for f in resolve_input(self._arg, self.options, None).files]
            except UsageError:
                pass  # gone or unreadable now: the files listed before say so (fingerprint.input_change)
        return [f.path for f in self.input.files]

    def close(self) -> None:
        self._con.close()
        self._plain.close()

    def __enter__(self) -> TableSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """The whole table in file order (for tests, small outputs and library users)."""
    with TableSource(path) as src:
        if src.empty:
            return pa.table({})
        try:
            return src._con.sql(src._limited_sql()).to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {path}: {_one_line(exc)}") from exc
