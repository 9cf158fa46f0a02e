"""All table reading and writing: the one package that talks to DuckDB.

Input rows are streamed as Arrow record batches with an explicit ordinal row id, so the rest of the CLI
never depends on DuckDB's ordering rules; the output is a DuckDB join of the input (read a second time)
with the result columns on that row id, written to a temporary file and renamed into place.

CSV input is read strictly (RFC 4180 quoting with `"`, the delimiter agreed by the first records) so that
a malformed file fails with DuckDB's error naming the line instead of being silently read with another
dialect; `skip_bad_rows` rejects such lines instead and keeps them (line number, error type, text) for a
rejects file. The files DuckDB's strict mode cannot read although they are well formed (a CRLF header
holding a quoted line break; records ending in both '\r\n' and '\n') are read in its lenient mode, and
then every record is checked by Python's strict csv reader instead, so a malformed one still fails.
Values are never rewritten on the way through:
- CSV columns are read as text (VARCHAR), exactly as in the file (`00501`, `1.50`, `t`, `01/02/2024`);
  an empty field is NULL, `""` is empty text, and CSV output writes them back the same way. CSV
  output, which has no nested types, writes lists, structs and maps as JSON text.
- JSON's columns and types are detected from every record of every file (never a sample), then
  declared to every later read. JSON keeps its own types: strings DuckDB would take for dates, times
  or UUIDs stay strings, and a top-level number column whose values are all integers is read exactly
  (DECIMAL(38,0), or the digits as text beyond that) instead of as doubles. JSON output writes
  NaN/Infinity/-Infinity as the strings "NaN", "Infinity", "-Infinity" (the protobuf JSON
  convention), so every line is valid JSON.
- Parquet types pass through: Parquet output casts each column DuckDB read in another representation
  (units, time zones, durations, fixed-size binary, uuids, dictionaries, nested values) back to the
  input's own type, keeping DuckDB's where a value would not survive; HUGEINT, which Parquet cannot
  hold, is written as DECIMAL(38,0), never as a double.
- Time zones never come from the machine: every connection's session zone is UTC, and a time whose
  Parquet column has a zone is given to templates, and written to CSV and JSON, in that zone.
Every local path DuckDB sees is a plain-named symlink (plain_paths.py): a user's path is never a glob
(--input-glob patterns are expanded by Python, in sorted order). URLs go to DuckDB as given.

The package: common.py (formats, quoting, connections), inputs.py (what INPUT names: files, a directory,
a pattern, stdin, URLs), csv_dialect.py (dialect and record count), json_types.py (exact JSON types),
source.py (TableSource, reading), validation.py (its one full read: counts, rejects), writing.py
(output), arrow_types.py (the input's own Arrow types put back), zones.py (times as text in their own zone), token_sort.py (out-of-core sort of token
sequences for `analyze` and `run`'s global plan; imported on demand). All of
batchllm's DuckDB calls live in this package.
"""
from batchllm_cli.table_io.common import (
    CSV_MAX_LINE_SIZE,
    DEFAULT_MAX_REJECTS,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    ROW_ID,
    duckdb_key,
    Column,
    _connect,
    output_format,
)
from batchllm_cli.table_io.csv_dialect import CsvDialect, _csv_records
from batchllm_cli.table_io.inputs import FORMAT_CHOICES, InputOptions
from batchllm_cli.table_io.source import TableSource, read_table
from batchllm_cli.table_io.writing import check_output_path, write_output, write_query_jsonl, write_table_jsonl

__all__ = [
    "CSV_MAX_LINE_SIZE", "DEFAULT_MAX_REJECTS", "INPUT_FORMATS", "OUTPUT_FORMATS", "ROW_ID",
    "FORMAT_CHOICES", "InputOptions", "Column", "CsvDialect", "TableSource", "_connect", "_csv_records", "check_output_path", "duckdb_key",
    "output_format", "read_table", "write_output", "write_query_jsonl", "write_table_jsonl",
]
