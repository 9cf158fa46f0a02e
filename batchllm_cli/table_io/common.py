"""Formats, SQL quoting, DuckDB errors and connections shared by reading and writing tables."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from batchllm_cli.durable import disk_full_reason, full_disk_fix
from batchllm_cli.errors import OutputError, TempFailError, UsageError
from batchllm_cli.plain_paths import PlainPaths, temp_full_error


# The ordinal row id travels with every batch and result; the name is unlikely to clash with a user's
# column, and a clash is refused up front rather than silently shadowed.
ROW_ID = "__batchllm_row_id"

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def duckdb_key(name: str) -> str:
    """A column name as DuckDB compares it: ASCII letters folded to lower case, everything else as is."""
    return name.translate(_ASCII_LOWER)

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
# USE_TMP_FILE false: DuckDB writes into our own temporary file (through its plain-named link) instead of
# renaming a file of its own over the link; the rename into place is ours (_copy_atomically).
_COPY_OPTIONS = {
    "parquet": "FORMAT parquet, USE_TMP_FILE false",
    "csv": "FORMAT csv, HEADER true, USE_TMP_FILE false",
    "json": "FORMAT json, USE_TMP_FILE false",
}

_PARQUET_BATCH_ROWS = 122_880  # DuckDB's row group size: Parquet output keeps the same row groups

# Rows longer than DuckDB's 2 MB default (a long document in one cell) are legitimate input; a prompt
# that long becomes a per-row "prompt too long" error later instead of failing the whole file.
CSV_MAX_LINE_SIZE = 64 * 2**20
# The same for one JSON record (DuckDB's default maximum_object_size is 16 MB, and refused the file).
JSON_MAX_RECORD_SIZE = CSV_MAX_LINE_SIZE
_CSV_DELIMITERS = (",", ";", "\t", "|")
# DuckDB's CSV errors carry the reason on a later line; these start the lines worth quoting.
_CSV_REASONS = (
    "Expected Number of Columns",
    "Value with unterminated quote",
    "Invalid unicode",
    "Error when converting column",
    "Maximum line size",
)
# DuckDB's JSON schema detection refuses keys of nested objects that differ only in case ('a' and 'A',
# in one object or in two records), suggesting an option batchllm does not offer.
_JSON_DUPLICATE_KEY = re.compile(r'Duplicate name "(.*)" in struct auto-detected in JSON')
_SCALAR_ID_TYPES = ("LIST", "STRUCT", "MAP", "UNION", "[]")
# --max-rejects: more rejected records than this fail the job (a file that bad is the wrong file, or
# needs fixing, not a run that quietly drops rows).
DEFAULT_MAX_REJECTS = 100
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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
    duplicate = _JSON_DUPLICATE_KEY.search(head)
    if duplicate:
        return (f"nested JSON objects in it have the key {duplicate.group(1)!r} and another that differs from it "
                "only in upper/lower case, which DuckDB (batchllm's table reader) cannot tell apart; rename one "
                "of them in the input.")
    if "CSV Error on Line" in head:
        reason = next((line for line in lines[1:] if line.startswith(_CSV_REASONS)), None)
        if reason:
            head = f"{head.rstrip('.')}: {reason}"
    return head


def _write_error(path: Path, exc: BaseException) -> Exception:
    """The error to raise when writing `path` failed: disk full is temporary (75), the rest fatal. DuckDB's
    spill files filling the temp directory are named as such: freeing space at `path` would not help."""
    in_temp = temp_full_error(exc)
    if in_temp is not None:
        return in_temp
    reason = disk_full_reason(exc)
    if reason is not None:
        return TempFailError(
            f"Cannot write {path}: {reason}. Finished rows are kept; {full_disk_fix(reason)} and "
            "run the same command again to resume."
        )
    return OutputError(f"Cannot write {path}: {_one_line(exc)}")


def _format_of(path: Path, formats: dict[str, str], verb: str) -> str:
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"Cannot {verb} {path}: unknown file type {path.suffix or '(none)'!r}; use one of {', '.join(formats)}."
        )
    return fmt


def output_format(path: Path) -> str:
    return _format_of(path, OUTPUT_FORMATS, "write")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB's type name, e.g. VARCHAR, BIGINT, STRUCT(...)


def _connect(plain: PlainPaths) -> duckdb.DuckDBPyConnection:
    """A connection whose spill files go to `plain`'s private directory (close it before `plain`),
    never to `.tmp` in the user's current directory."""
    con = duckdb.connect(":memory:", config={"temp_directory": plain.spill_dir()})
    con.execute("SET enable_progress_bar = false")  # a long read would draw on the user's terminal
    # A URL input needs httpfs: loaded if installed, never downloaded behind the user's back.
    con.execute("SET autoinstall_known_extensions = false")
    # The default, set explicitly because row ids and output order rely on it.
    con.execute("SET preserve_insertion_order = true")
    _use_utc(con)
    return con


def _use_utc(con: duckdb.DuckDBPyConnection) -> None:
    """Times with a zone are read, compared (--where) and printed in UTC, never in the machine's zone
    ($TZ, DuckDB's default): a job's prompts and output must not change with the machine it runs on.
    GLOBAL: the connection's cursors (streaming readers) are sessions of their own."""
    try:
        con.execute("SET GLOBAL TimeZone = 'UTC'")
    except duckdb.Error:
        pass  # a DuckDB built without its icu extension has no zones at all: everything is UTC already
