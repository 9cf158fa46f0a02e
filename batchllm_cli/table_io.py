"""All table reading and writing: the one module that talks to DuckDB.

Input rows are streamed as Arrow record batches with an explicit ordinal row id, so the rest of the CLI
never depends on DuckDB's ordering rules; the output is a DuckDB join of the input (read a second time)
with the result columns on that row id, written to a temporary file and renamed into place.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Iterator

import duckdb
import pyarrow as pa

from batchllm_cli.errors import InputError, OutputError, UsageError

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


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _one_line(exc: BaseException) -> str:
    # DuckDB messages carry multi-line hints (the offending CSV line, sniffer settings); the CLI
    # contract is one line, so keep the headline and leave the rest to --help / the docs.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


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


class TableSource:
    """An input table: its columns (known without reading the data) and its rows as Arrow batches.

    `limit` keeps only the first N rows everywhere (stream, count and output join), so a --limit run
    is a consistent prefix of the table.
    """

    def __init__(self, path: str | os.PathLike[str], limit: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"Input file not found: {self.path}")
        if not self.path.is_file():
            raise UsageError(f"Input is not a file: {self.path}")
        if limit is not None and limit < 0:
            raise UsageError("--limit must be 0 or more.")
        self.format = input_format(self.path)
        self.limit = limit
        self._con = _connect()
        try:
            # Binding the query only sniffs a sample (CSV/JSON) or reads the footer (Parquet).
            rel = self._con.sql(f"SELECT * FROM {self.scan_sql()}")
            self.columns: tuple[Column, ...] = tuple(
                Column(name, str(typ)) for name, typ in zip(rel.columns, rel.types)
            )
        except duckdb.Error as exc:
            self._con.close()
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}") from exc
        if ROW_ID in self.column_names:
            self._con.close()
            raise UsageError(f"Input column {ROW_ID!r} is reserved by batchllm; rename it.")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def scan_sql(self) -> str:
        """The DuckDB table function that reads the file (no row id, no limit)."""
        path = _literal(str(self.path))
        if self.format == "csv":
            return f"read_csv({path})"
        if self.format == "parquet":
            return f"read_parquet({path})"
        if self.format == "jsonl":
            return f"read_json({path}, format = 'newline_delimited')"
        return f"read_json({path}, format = 'auto')"

    def numbered_sql(self) -> str:
        """A subquery with the row id first, then every input column, in file order.

        row_number() OVER () is a streaming window in DuckDB that numbers rows in scan order (which
        preserve_insertion_order keeps equal to file order, even with parallel CSV reading); the limit
        sits inside so only the first N rows are read at all.
        """
        inner = f"SELECT * FROM {self.scan_sql()}"
        if self.limit is not None:
            inner += f" LIMIT {int(self.limit)}"
        return f"(SELECT row_number() OVER () - 1 AS {_ident(ROW_ID)}, * FROM ({inner}))"

    def count_rows(self) -> int:
        try:
            inner = f"SELECT * FROM {self.scan_sql()}"
            if self.limit is not None:
                inner += f" LIMIT {int(self.limit)}"
            # A cursor of its own: in DuckDB 2 an open result owns its connection until drained.
            cur = self._con.cursor()
            try:
                row = cur.execute(f"SELECT count(*) FROM ({inner})").fetchall()[0]
            finally:
                cur.close()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {self.path}: {_one_line(exc)}") from exc
        return int(row[0]) if row else 0

    def batches(self, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `batch_size` rows: the row id column, then the input columns."""
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
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.{uuid.uuid4().hex}.probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"Output directory {parent} is not writable: {exc.strerror or exc}.") from exc
    return out


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some filesystems (and Windows) cannot open directories; durability is best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_output(source: TableSource, results: pa.Table, output: str | os.PathLike[str]) -> Path:
    """Write input columns (unchanged, in order) + result columns, rows in input order, atomically.

    `results` has the ROW_ID column plus the new columns; input rows without a result get nulls.
    """
    out = Path(output)
    fmt = output_format(out)
    if ROW_ID not in results.column_names:
        raise ValueError(f"results need a {ROW_ID} column")
    clash = set(source.column_names) & (set(results.column_names) - {ROW_ID})
    if clash:
        raise UsageError(f"Output column(s) {sorted(clash)} already exist in the input; use --column.")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    rid = _ident(ROW_ID)
    query = (
        f"SELECT src.* EXCLUDE ({rid}), res.* EXCLUDE ({rid}) "
        f"FROM {source.numbered_sql()} AS src LEFT JOIN batchllm_results AS res "
        f"ON src.{rid} = res.{rid} ORDER BY src.{rid}"
    )
    con = _connect()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        con.register("batchllm_results", results)
        con.execute(f"COPY ({query}) TO {_literal(str(tmp))} ({_COPY_OPTIONS[fmt]})")
        con.close()
        _fsync_path(tmp)
        os.replace(tmp, out)
        _fsync_path(out.parent if str(out.parent) else Path("."), directory=True)
    except (duckdb.Error, OSError) as exc:
        raise OutputError(f"Cannot write {out}: {_one_line(exc)}") from exc
    finally:
        con.close()
        if tmp.exists():
            tmp.unlink()
    return out


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """The whole table in file order (for tests, small outputs and library users)."""
    with TableSource(path) as src:
        try:
            return src._con.sql(f"SELECT * FROM {src.scan_sql()}").to_arrow_table()
        except duckdb.Error as exc:
            raise InputError(f"Cannot read {path}: {_one_line(exc)}") from exc
