"""Column names as DuckDB sees them: the one check that no name batchllm reads, adds or uses internally
collides with another.

DuckDB compares identifiers ignoring ASCII case (`Response` and `response` are one column to it) and
makes duplicate names unique by renaming (`Text,text` is read as `Text`, `text_1`). Either would
change what a user gets back: an answer column renamed `response_1`, an input column renamed, or an
input column shadowing batchllm's row id. So every collision is refused before any model loads,
comparing names exactly the way DuckDB does.
"""
from __future__ import annotations

from typing import Sequence

from batchllm_cli.collector import OutputColumns
from batchllm_cli.errors import UsageError
from batchllm_cli.table_io import ROW_ID, duckdb_key

def _first_collision(names: Sequence[str]) -> tuple[str, str] | None:
    seen: dict[str, str] = {}
    for name in names:
        key = duckdb_key(name)
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def check_input_names(file_names: Sequence[str], input_names: Sequence[str]) -> None:
    """UsageError when two input columns are one to DuckDB, or one is batchllm's row id column.

    `file_names` are the names as the file spells them; `input_names` as DuckDB reads them.
    """
    for position, name in enumerate(file_names, start=1):
        if "\x00" in name:
            # DuckDB ends a name at a NUL byte: the output column would come back renamed.
            raise UsageError(f"Input column {name!r} contains a NUL character, which DuckDB cannot keep; rename it.")
        if name == "":
            # DuckDB cannot hold an empty name (it would come back as `column0`).
            raise UsageError(
                f"Input column {position} has no name (as pandas writes its index with to_csv()); name it in the "
                "header, or write the file without it (to_csv(index=False))."
            )
    dup = _first_collision(list(file_names))
    if dup is not None:
        a, b = dup
        same = "have the same name" if a == b else "differ only in upper/lower case"
        raise UsageError(
            f"Input columns {a!r} and {b!r} {same}, which DuckDB (batchllm's table reader) cannot tell "
            "apart; rename one of them in the input."
        )
    for name in input_names:
        if duckdb_key(name) == duckdb_key(ROW_ID):
            raise UsageError(
                f"Input column {name!r} is reserved by batchllm (names are compared ignoring case); rename it."
            )


def check_output_names(input_names: Sequence[str], columns: OutputColumns) -> None:
    """UsageError naming --column when an answer column would collide with an input or internal column."""
    if "\x00" in columns.prefix:
        raise UsageError("--column must not contain a NUL character; pick another --column.")
    taken = {duckdb_key(n): n for n in input_names}
    taken[duckdb_key(ROW_ID)] = ROW_ID
    for name in columns.names:
        other = taken.get(duckdb_key(name))
        if other is not None:
            what = "batchllm's internal row id column" if other == ROW_ID else f"the input column {other!r}"
            raise UsageError(
                f"The answer column {name!r} (from --column {columns.prefix}) would collide with {what} "
                "(column names are compared ignoring case); pick another --column."
            )


def check_column_names(file_names: Sequence[str], input_names: Sequence[str], columns: OutputColumns | None) -> None:
    """Every column-name check of a job: the input's own names, then the answer columns against them."""
    check_input_names(file_names, input_names)
    if columns is not None:
        check_output_names(input_names, columns)
