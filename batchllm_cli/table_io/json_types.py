"""JSON types read exactly: strings stay strings, integers and long numbers are not rounded."""
from __future__ import annotations

import json
from typing import Callable, Sequence

import duckdb

from batchllm_cli.table_io.common import Column, _ident, _literal


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
    con: duckdb.DuckDBPyConnection,
    read_json: Callable[[str], str],
    sniffed: Sequence[tuple[str, duckdb.DuckDBPyType]],
) -> tuple[Column, ...]:
    """Declared columns for a JSON read that keeps every value exact, from the `sniffed` (name, type)
    pairs of the files' own keys (every later read declares them, so none sniffs again).

    DuckDB reads a number column as DOUBLE as soon as one value does not fit BIGINT, which rounds every
    integer beyond 2^53; such a column whose values are all integers is read as DECIMAL(38,0) (exact),
    or as the digits' text when one has more than 38 digits. Any other column holding doubles (a mixed
    number column, a list or struct of numbers) in which some number has 16 or more digits in a row
    (so a double may round it) is read as JSON: its values' own text, exactly.
    """
    cols = [Column(n, _json_read_type(t)) for n, t in sniffed]
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
    return tuple(cols)


Decoder = Callable[[object], object]


def nested_json_decoder(sql_type: str) -> Decoder | None:
    """For a column type holding JSON values below its top level (a JSON[] of mixed elements, a struct
    field of mixed types): a function turning the JSON texts inside its Python value into the values
    they spell, so a template prints [1, "a"] rather than ["1", "\\"a\\""]. None when nothing below the
    top level is JSON (a top-level JSON column stays its exact text, as documented)."""
    try:
        typ = duckdb.sqltype(sql_type)
    except (duckdb.Error, ValueError, TypeError):  # a type this DuckDB cannot parse holds no JSON we know of
        return None
    return None if str(typ) == "JSON" else _decoder(typ)


def _decoder(typ: duckdb.DuckDBPyType) -> Decoder | None:
    if str(typ) == "JSON":
        return lambda v: None if v is None else json.loads(v)
    if typ.id in ("list", "array"):
        item = _decoder(typ.children[0][1])
        return None if item is None else (lambda v: None if v is None else [item(x) for x in v])
    if typ.id == "struct":
        fields = {name: _decoder(t) for name, t in typ.children}
        if not any(fields.values()):
            return None
        return lambda v: None if v is None else {k: (fields[k](x) if fields.get(k) else x) for k, x in v.items()}
    if typ.id == "map":  # a map reaches templates as a dict (to_pylist's maps_as_pydicts)
        value = _decoder(typ.children[1][1])
        return None if value is None else (lambda v: None if v is None else {k: value(x) for k, x in v.items()})
    return None
