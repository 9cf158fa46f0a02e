"""Several input files read as one table: the columns they must share, and hive partition values.

Files are never unioned by name: a file whose columns differ from the first file's (names and order
for CSV and Parquet, the set of keys for JSON), or for Parquet whose column types DuckDB would read
as another type, is refused, naming both, so no column is silently filled with nulls or cast. Hive
`key=value` directories become text columns after the files' own, attached by the file each row
came from (DuckDB's own hive parsing would read our private link names).
"""
from __future__ import annotations

from typing import Callable, Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm_cli.errors import UsageError
from batchllm_cli.table_io.common import _ident, _literal, duckdb_key
from batchllm_cli.table_io.csv_dialect import CsvDialect, CsvText, _sniff_csv
from batchllm_cli.table_io.inputs import InputFile, gzip_read_errors

# The file each row came from, while hive partition values are attached to it (never in a result).
FILE_COLUMN = "__batchllm_file"


def load_httpfs(con: duckdb.DuckDBPyConnection, url: str) -> None:
    """httpfs reads s3://, gs:// and https:// URLs; it is an extension DuckDB downloads once (INSTALL)."""
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        raise UsageError(
            f"Cannot read {url}: DuckDB's httpfs extension is not installed here (it is downloaded once, with "
            "network access: python -c \"import duckdb; duckdb.sql('INSTALL httpfs')\"); or download the file "
            "and give its local path."
        ) from None


def refuse_different(a: str, a_names: Sequence[str], b: str, b_names: Sequence[str]) -> None:
    raise UsageError(
        f"The input files have different columns: {a} has ({', '.join(a_names)}) but {b} has "
        f"({', '.join(b_names)}); give files with the same columns in the same order."
    )


def csv_dialect(
    con: duckdb.DuckDBPyConnection,
    files: Sequence[InputFile],
    scan_paths: Sequence[str],
    text_of: Callable[[InputFile], CsvText],
    delimiter: str | None,
    duckdb_encoding: str,
) -> CsvDialect:
    """The dialect of the first file, which every other file must share (same columns in the same order)."""
    first: CsvDialect | None = None
    for f, scan in zip(files, scan_paths):
        if f.is_url:
            d = _url_csv_dialect(con, scan, delimiter, duckdb_encoding)
        else:
            with gzip_read_errors(f.name):
                d = _sniff_csv(scan, f.path, con, text_of(f), delimiter=delimiter, duckdb_encoding=duckdb_encoding)
        if first is None:
            first = d
        elif d.names != first.names:
            refuse_different(files[0].name, first.names, f.name, d.names)
        elif d.delimiter != first.delimiter:
            raise UsageError(f"The input files have different delimiters: {files[0].name} uses {first.delimiter!r} "
                             f"but {f.name} uses {d.delimiter!r}; give files of one dialect.")
    assert first is not None
    return first


def _url_csv_dialect(con: duckdb.DuckDBPyConnection, url: str, delimiter: str | None, encoding: str) -> CsvDialect:
    """A remote CSV's dialect from DuckDB's sniffer (the Python checks read local files only)."""
    delim = f", delim={_literal(delimiter)}" if delimiter else ""
    row = con.execute(
        f"SELECT Delimiter, Columns FROM sniff_csv({_literal(url)}, header=true, all_varchar=true{delim}, "
        f"encoding={_literal(encoding)})"
    ).fetchall()[0]
    return CsvDialect(row[0], tuple(c["name"] for c in row[1]))


def parquet_schema(
    con: duckdb.DuckDBPyConnection, files: Sequence[InputFile], scan_paths: Sequence[str]
) -> pa.Schema | None:
    """The first local file's Arrow schema (its own types, kept in Parquet output); every local file
    must have the same column names in the same order, and each column a type DuckDB reads as the
    first file's (see _check_types)."""
    first: tuple[InputFile, str, pa.Schema] | None = None
    for f, scan in zip(files, scan_paths):
        if f.is_url:
            continue
        with f.path.open("rb") as data:  # a file object: pyarrow would parse a path as a URI
            schema = pq.read_schema(data)
        for field in schema:
            _check_field_names(f.name, field.name, field.type)
        if first is None:
            first = (f, scan, schema)
        elif list(schema.names) != list(first[2].names):
            refuse_different(first[0].name, first[2].names, f.name, schema.names)
        else:
            _check_types(con, first, (f, scan, schema))
    return first[2] if first is not None else None


def _check_types(con: duckdb.DuckDBPyConnection, first: tuple[InputFile, str, pa.Schema],
                 other: tuple[InputFile, str, pa.Schema]) -> None:
    """UsageError when a column of `other` has a type DuckDB does not read as the first file's.

    DuckDB reads every file with the first file's types, casting the other files' values: 2.7 in a
    double column became 3 in the first file's int64 column, a decimal(10,4) lost two digits, with
    no error. Allowed: a column DuckDB reads as one type (timestamp[ms] and [us] are both its
    TIMESTAMP, half floats are floats; the README says so) in the same time zones (else the first
    file's zone would print every file's times), and a later file's column of nulls only. A widening
    (int32 then int64) is refused too: DuckDB reads it only while every value fits, and whether it
    applies at all would depend on which file sorts first."""
    (a, a_scan, a_schema), (b, b_scan, b_schema) = first, other
    differ = [i for i, (x, y) in enumerate(zip(a_schema.types, b_schema.types)) if x != y and not pa.types.is_null(y)]
    if not differ:
        return
    a_read, b_read = (con.sql(f"SELECT * FROM read_parquet({_literal(s)}) LIMIT 0").types for s in (a_scan, b_scan))
    for i in differ:
        a_type, b_type = a_schema.types[i], b_schema.types[i]
        if str(a_read[i]) != str(b_read[i]) or _zones(a_type) != _zones(b_type):
            raise UsageError(
                f"The input files have different types for column {a_schema.names[i]!r}: {a.name} has "
                f"{a_type} but {b.name} has {b_type}; write the files with one type for it (every file's "
                f"values would be read as {a.name}'s type)."
            )


def _check_field_names(file: str, path: str, typ: pa.DataType) -> None:
    """UsageError when a struct inside column `path` (at any depth) has two fields DuckDB cannot tell
    apart: it compares names ignoring case and renamed the second (`A` came back as `A_1` in every
    output, and a template's `st.A` failed). Top-level names are column_names.py's check."""
    if pa.types.is_dictionary(typ):
        _check_field_names(file, path, typ.value_type)
    elif isinstance(typ, pa.BaseExtensionType):
        _check_field_names(file, path, typ.storage_type)
    elif pa.types.is_map(typ):
        _check_field_names(file, f"{path}[key]", typ.key_type)
        _check_field_names(file, f"{path}[value]", typ.item_type)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        _check_field_names(file, f"{path}[]", typ.value_type)
    elif pa.types.is_struct(typ):
        seen: dict[str, str] = {}
        for field in (typ.field(i) for i in range(typ.num_fields)):
            other = seen.get(duckdb_key(field.name))
            if other is not None:
                same = "have the same name" if other == field.name else "differ only in upper/lower case"
                raise UsageError(
                    f"The fields {other!r} and {field.name!r} of input column {path} in {file} {same}, which "
                    "DuckDB (batchllm's table reader) cannot tell apart; rename one of them in the input."
                )
            seen[duckdb_key(field.name)] = field.name
            _check_field_names(file, f"{path}.{field.name}", field.type)


def _zones(typ: pa.DataType) -> tuple[str | None, ...]:
    """The time zones of the timestamps in `typ`, nested ones too, in order."""
    if pa.types.is_timestamp(typ):
        return (typ.tz,)
    if pa.types.is_dictionary(typ):
        return _zones(typ.value_type)
    if isinstance(typ, pa.BaseExtensionType):
        return _zones(typ.storage_type)
    return tuple(z for i in range(typ.num_fields) for z in _zones(typ.field(i).type))


def check_json_files(
    con: duckdb.DuckDBPyConnection,
    files: Sequence[InputFile],
    scan_paths: Sequence[str],
    read_one: Callable[[str], str],
) -> None:
    """Every JSON file has the first file's keys (`read_one(path)` reads one file). Each file is
    compared with the first file's own keys, not with the whole input's (their union), so the
    message names the file each key set belongs to."""
    if len(files) < 2:
        return
    first: list[str] | None = None
    for f, scan in zip(files, scan_paths):
        own = sorted(con.sql(f"SELECT * FROM {read_one(scan)} LIMIT 0").columns)
        if first is None:
            first = own
        elif own != first:
            refuse_different(files[0].name, first, f.name, own)


def check_partition_keys(keys: Sequence[str], names: Sequence[str], label: str) -> None:
    taken = {duckdb_key(n) for n in names}
    clash = [k for k in keys if duckdb_key(k) in taken]
    if clash:
        raise UsageError(
            f"The hive partition directory {clash[0]}=... of {label} is also a column of its files; rename one."
        )


def with_partitions(scan: str, keys: Sequence[str], files: Sequence[InputFile], scan_paths: Sequence[str]) -> str:
    """SELECT every column of `scan` (read with FILE_COLUMN), then each hive key as a text column."""
    if not keys:
        return f"SELECT * FROM {scan}"
    parts = []
    for i, key in enumerate(keys):
        cases = " ".join(
            f"WHEN {_literal(link)} THEN {'NULL' if f.partitions[i][1] is None else _literal(f.partitions[i][1])}"
            for link, f in zip(scan_paths, files)
        )
        parts.append(f"CAST(CASE {_ident(FILE_COLUMN)} {cases} END AS VARCHAR) AS {_ident(key)}")
    return f"SELECT * EXCLUDE ({_ident(FILE_COLUMN)}), {', '.join(parts)} FROM {scan}"
