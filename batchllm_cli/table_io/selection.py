"""--columns and --where: which of the input's columns and rows a job sees, checked before any model loads."""
from __future__ import annotations

from typing import Callable, Sequence

import duckdb

from batchllm_cli.errors import UsageError
from batchllm_cli.table_io.common import Column


def selected_columns(columns: Sequence[Column], wanted: Sequence[str]) -> tuple[Column, ...]:
    """The columns named by --columns, in that order (exact names)."""
    by_name = {c.name: c for c in columns}
    missing = [w for w in wanted if w not in by_name]
    if missing or not wanted:
        available = ", ".join(by_name) or "(none)"
        what = f"{missing[0]!r} is not a column of the input" if missing else "no column given"
        raise UsageError(f"--columns: {what}; available columns: {available}.")
    if len(set(wanted)) != len(wanted):
        raise UsageError("--columns names a column twice; name each once.")
    return tuple(by_name[w] for w in wanted)


def checked_where(
    con: duckdb.DuckDBPyConnection, where: str, table_sql: str, reason: Callable[[BaseException], str], text_columns: bool
) -> str:
    """--where as one parsed expression (so it cannot reach outside its WHERE clause), bound against the
    columns of `table_sql` and of type BOOLEAN; a one-line UsageError otherwise."""
    try:
        expr = str(duckdb.SQLExpression(where))
        rel = con.sql(f"SELECT ({expr}) AS w FROM ({table_sql}) LIMIT 0")
    except duckdb.Error as exc:
        hint = " (CSV columns are text: compare with CAST(col AS INTEGER) or col::DOUBLE)" if (
            text_columns and "explicit cast" in str(exc)) else ""
        raise UsageError(f"--where {where!r}: {reason(exc)}{hint}") from None
    if str(rel.types[0]) != "BOOLEAN":
        raise UsageError(f"--where {where!r} is {rel.types[0]}, not true/false; give a condition such as "
                         "\"lang = 'en' AND length(text) > 10\".")
    return expr
