"""Output: the input joined with the result columns, written to a temporary file and renamed into place."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm_cli.durable import check_writable_dir, fsync_dir, fsync_file, temp_name
from batchllm_cli.errors import UsageError
from batchllm_cli.plain_paths import PlainPaths
from batchllm_cli.table_io.common import (
    _COPY_OPTIONS, _PARQUET_BATCH_ROWS, ROW_ID, _connect, _ident, _literal, _write_error, duckdb_key, output_format,
)
from batchllm_cli.table_io.arrow_types import (
    LossyCast, cast_batch, own_type, own_zone, restorable, restored_schema, storage_of,
)
from batchllm_cli.table_io.source import TableSource
from batchllm_cli.table_io.zones import zoned_text


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


def _rewrite_columns(
    con: duckdb.DuckDBPyConnection, query: str, rewrite: Callable[[str, str, duckdb.DuckDBPyType], str | None]
) -> str:
    """`query` with each column replaced by `rewrite(name, expr, type)` (None: the column as it is)."""
    rel = con.sql(f"SELECT * FROM ({query}) LIMIT 0")
    exprs = [(rewrite(n, f"q.{_ident(n)}", t), n) for n, t in zip(rel.columns, rel.types)]
    if all(e is None for e, _ in exprs):
        return query
    picked = ", ".join(f"{e if e is not None else f'q.{_ident(n)}'} AS {_ident(n)}" for e, n in exprs)
    return f"SELECT {picked} FROM ({query}) AS q"


def _json_safe_query(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """`query` with its non-finite floats as valid JSON strings (DuckDB would write bare NaN)."""
    return _rewrite_columns(con, query, lambda _, expr, t: _json_safe(expr, t))


_NESTED = ("list", "array", "struct", "map", "union")


def _csv_query(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """`query` with its nested columns (lists, arrays, structs, maps, unions) as JSON text, non-finite
    floats inside them as the strings JSON output uses: CSV has no nested types, and DuckDB's CSV
    writer would print its own syntax (`{'k': 'it\\'s'}`, `[a, b]`), which no JSON reader takes."""
    return _rewrite_columns(
        con, query, lambda _, expr, t: f"to_json({_json_safe(expr, t) or expr})" if t.id in _NESTED else None)


def _zoned_text_query(con: duckdb.DuckDBPyConnection, query: str, keep: pa.Schema | None) -> str:
    """`query` with each input column whose file gives it a time zone as text in that zone (zones.py),
    as templates see it; DuckDB would print it in its session zone, UTC. Times nested in lists and
    structs stay in UTC (with their offset)."""

    def rewrite(name: str, expr: str, typ: duckdb.DuckDBPyType) -> str | None:
        zone = own_zone(keep, name)
        return None if zone is None else zoned_text(con, expr, typ.id, zone)

    return query if keep is None else _rewrite_columns(con, query, rewrite)


def _uuids_as_bytes(con: duckdb.DuckDBPyConnection, query: str, keep: pa.Schema | None) -> str:
    """`query` with each UUID column the input holds as 16 bytes (arrow.uuid, fixed_size_binary[16]) as
    those bytes: DuckDB's Arrow export gives a UUID as its text, which no Arrow cast turns into bytes."""

    def rewrite(name: str, expr: str, typ: duckdb.DuckDBPyType) -> str | None:
        own = own_type(keep, name)
        if typ.id != "uuid" or own is None or storage_of(own) != pa.binary(16) or not restorable(own, pa.binary()):
            return None
        return f"CAST({expr} AS BLOB)"

    return query if keep is None else _rewrite_columns(con, query, rewrite)


def _write_arrow(con: duckdb.DuckDBPyConnection, query: str, tmp: Path, schema: pa.Schema) -> None:
    """`query` through Arrow, each batch cast to `schema`, into `tmp` (truncated first: a write that
    stopped at a LossyCast starts again from nothing)."""
    with con.sql(query).to_arrow_reader(_PARQUET_BATCH_ROWS) as reader, tmp.open("wb") as f:
        with pq.ParquetWriter(f, schema, compression="snappy") as writer:
            for batch in reader:
                writer.write_batch(cast_batch(batch, schema))


def _write_parquet(con: duckdb.DuckDBPyConnection, query: str, tmp: Path, keep: pa.Schema | None) -> None:
    """DuckDB's COPY (parallel), or, when the input has types DuckDB reads in another representation
    (units, time zones, durations, fixed sizes, uuids, dictionaries: arrow_types.py), through Arrow
    with the input's own types put back. A column with a value its own type cannot hold (found in any
    batch) keeps DuckDB's type, and the file is written again: `tmp` is renamed into place only after
    this returns, so no reader ever sees the abandoned attempt. HUGEINT, which Parquet cannot hold
    and COPY would write as a double, goes as DECIMAL(38,0)."""
    query = _uuids_as_bytes(con, query, keep)
    rel = con.sql(f"SELECT * FROM ({query}) LIMIT 0")
    got = rel.to_arrow_table().schema  # DuckDB's Arrow export gives HUGEINT as decimal128(38, 0) already
    lossy: set[str] = set()
    while (schema := restored_schema(got, keep, lossy)) is not None:
        try:
            _write_arrow(con, query, tmp, schema)
            return
        except LossyCast as exc:
            lossy.add(exc.column)
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
            query = _zoned_text_query(con, query, keep_types)
            if fmt == "json":
                query = _json_safe_query(con, query)
            elif fmt == "csv":
                query = _csv_query(con, query)
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
        # Refused before any model loaded (column_names.check_column_names): here only an invariant.
        assert not {duckdb_key(n) for n in source.column_names} & {duckdb_key(new) for _, new in pairs}, pairs
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


def check_output_path(
    output: str | os.PathLike[str], inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
) -> Path:
    """Refuse an output that cannot be written, before any model loads; creates nothing. `inputs` are
    the local input files (a URL is never the output)."""
    out = Path(output)
    output_format(out)
    for input_path in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
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
