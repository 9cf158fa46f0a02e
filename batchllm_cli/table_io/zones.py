"""A time with a time zone as text in its Parquet column's own zone, in DuckDB SQL (CSV and JSON output).

DuckDB prints a TIMESTAMPTZ in its session zone, which _connect sets to UTC so that nothing depends on
the machine's $TZ. A column whose file gives it a zone (America/New_York, +02:00) is printed as DuckDB
would print it with that zone as the session's: the wall-clock time there, then the offset as +HH,
+HH:MM or +HH:MM:SS (a zone's local mean time, before standard time, has seconds: -04:56:02).
"""
from __future__ import annotations

import re

import duckdb

from batchllm_cli.table_io.common import _literal

# DuckDB's zoned types (DuckDBPyType.id) and the plain type holding the same wall-clock time and unit.
_PLAIN = {"timestamp with time zone": "TIMESTAMP", "timestamptz_ns": "TIMESTAMP_NS"}
_UTC = ("UTC", "Etc/UTC", "+00:00")  # printed as DuckDB prints them already
_FIXED = re.compile(r"([+-])(\d\d):?(\d\d)")  # Arrow's fixed-offset zones


def _duckdb_knows(con: duckdb.DuckDBPyConnection, zone: str) -> bool:
    """Whether DuckDB has `zone` in its time zone database (else its column is printed in UTC)."""
    cur = con.cursor()
    try:
        cur.execute("SELECT timezone(?, TIMESTAMPTZ '2000-01-01 00:00:00+00')", [zone])
    except duckdb.Error:
        return False
    finally:
        cur.close()
    return True


def _offset_us(con: duckdb.DuckDBPyConnection, expr: str, zone: str) -> str | None:
    """SQL for `zone`'s offset from UTC at the instant `expr` (a TIMESTAMPTZ), in microseconds."""
    fixed = _FIXED.fullmatch(zone)
    if fixed:
        sign, hours, minutes = fixed.groups()
        return str((-1 if sign == "-" else 1) * (int(hours) * 3600 + int(minutes) * 60) * 10**6)
    if not _duckdb_knows(con, zone):
        return None
    return f"(epoch_us(timezone({_literal(zone)}, {expr})) - epoch_us({expr}))"


def _offset_text(offset_us: str) -> str:
    """SQL printing an offset as DuckDB does: +05:30, -05, -04:56:02."""
    s = f"abs(({offset_us}) // 1000000)"
    two = "lpad(CAST({} AS VARCHAR), 2, '0')"
    return (
        f"CASE WHEN ({offset_us}) < 0 THEN '-' ELSE '+' END || {two.format(f'{s} // 3600')}"
        f" || CASE WHEN {s} % 3600 = 0 THEN '' ELSE ':' || {two.format(f'{s} % 3600 // 60')} END"
        f" || CASE WHEN {s} % 60 = 0 THEN '' ELSE ':' || {two.format(f'{s} % 60')} END"
    )


def zoned_text(con: duckdb.DuckDBPyConnection, expr: str, type_id: str, zone: str) -> str | None:
    """SQL printing `expr` (DuckDB type `type_id`) in `zone`, with its offset; None when DuckDB's own
    text will do (UTC) or has to (a zone DuckDB does not know: UTC, with its offset, all the same)."""
    plain = _PLAIN.get(type_id)
    if plain is None or zone in _UTC:
        return None
    instant = f"CAST({expr} AS TIMESTAMPTZ)"  # the offset needs microseconds only (zones change on seconds)
    offset = _offset_us(con, instant, zone)
    if offset is None:
        return None
    wall = f"CAST(CAST({expr} AS {plain}) + to_microseconds({offset}) AS VARCHAR)"
    # infinity has no offset (and no wall-clock time): DuckDB's own text
    return f"CASE WHEN NOT isfinite({instant}) THEN CAST({expr} AS VARCHAR) ELSE {wall} || {_offset_text(offset)} END"
