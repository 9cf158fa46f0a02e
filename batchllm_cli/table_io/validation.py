"""TableSource's one full read of its input (`validate`): every row parsed and counted, so a malformed
file fails before the model loads, naming the line; CSV records checked against Python's strict reader;
with --skip-bad-rows the rejected records collected; a CSV file mixing line endings read leniently and
checked record by record. A mixin: the reading state (files, dialect, SQL) is TableSource's (source.py)."""
from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

import duckdb

from batchllm_cli.errors import BatchLLMError, InputError
from batchllm_cli.plain_paths import temp_full_error
from batchllm_cli.table_io.common import _connect, _ident, _literal
from batchllm_cli.table_io.csv_dialect import _one_per_record, check_lenient_read, check_record_count, mixed_line_endings
from batchllm_cli.table_io.inputs import gzip_read_errors

if TYPE_CHECKING:
    import pyarrow as pa


class ValidatedRead:
    _rows: int | None
    rejects: "pa.Table | None"

    def validate(self) -> int:
        """Read every row once (so a malformed file fails now, naming the line) and count the rows.

        With skip_bad_rows the rejected records are kept in `self.rejects`, one per record (see
        `_one_per_record`), and more than `max_rejects` of them is an InputError.
        """
        if self._rows is not None:
            return self._rows
        if self.empty:
            self._rows = 0
            return 0
        # A CSV file that mixes line endings fails DuckDB's strict read (an error, or with --skip-bad-rows
        # records rejected that are not malformed): it is then read again leniently, checked record by record.
        try:
            self._read_every_row()
        except duckdb.Error as exc:
            if not self._read_leniently_if_mixed_line_endings():
                raise self._read_error(exc) from exc
            self._read_again()
        else:
            if self.rejects is not None and self.rejects.num_rows and self._read_leniently_if_mixed_line_endings():
                self._read_again()
        rejected = self.rejects.num_rows if self.rejects is not None else 0
        if rejected > self.max_rejects:
            assert self.rejects is not None
            first = self.rejects.slice(0, 1).to_pylist()[0]
            raise InputError(
                f"Cannot read {self.path}: {rejected} malformed records, more than --max-rejects "
                f"{self.max_rejects} (the first on line {first['line']}: {first['error']}); fix the file, "
                "or raise --max-rejects if skipping them is right."
            )
        return self._rows

    def _read_every_row(self) -> None:
        """validate()'s read: the row count, the checks of CSV records against an independent reader,
        the rejected records; raises duckdb.Error when DuckDB cannot read the table."""
        con = _connect(self._plain)
        table = f"batchllm_rejects_{uuid.uuid4().hex[:8]}"
        try:
            # count(col) for every column makes DuckDB parse and convert every value (count(*) alone
            # can skip them), so a bad value later in the file is found now. Without a limit every
            # row is read, and the rows before --where are counted too (for the record count check).
            rejects_table = table if self.skip_bad_rows else None
            if self.limit is None:
                passed = f"count(*) FILTER (WHERE {self._where})" if self.options.where is not None else "count(*)"
                selects = [passed, "count(*)"] + [f"count({_ident(c.name)})" for c in self._table_columns]
                rows_sql = self._table_sql(rejects_table=rejects_table)
            else:
                selects = ["count(*)", "NULL"] + [f"count({_ident(c.name)})" for c in self.columns]
                rows_sql = self._limited_sql(rejects_table=rejects_table)
            rows = con.execute(f"SELECT {', '.join(selects)} FROM ({rows_sql}) AS t").fetchall()
            self._rows = int(rows[0][0]) if rows else 0
            read = rows[0][1] if rows else 0
            if self.is_csv:
                assert self._dialect is not None
                local = [(f.name, f.path, self._text(f)) for f in self.files if not f.is_url]
                check_lenient_read(local, self._dialect)
                # Rows before --where; with a limit, only a read that ended before it is the whole file.
                whole = int(read) if read is not None else (
                    self._rows if self.options.where is None and self._rows < (self.limit or 0) else None)
                if whole is not None and not self.skip_bad_rows and len(local) == len(self.files):
                    check_record_count(self.path, local, self._dialect, whole)
            if self.skip_bad_rows:
                # One entry per rejected line (DuckDB may list several errors for one line); with
                # several files, lines are per file and each entry names its file.
                file_name = ""
                if len(self.files) > 1:
                    cases = " ".join(f"WHEN {_literal(link)} THEN {_literal(name)}" for link, name in self._links.items())
                    file_name = f"any_value(CASE s.file_path {cases} END) AS file, "
                self.rejects = _one_per_record(con.sql(
                    f"SELECT {file_name}r.line, arg_min(r.error_type, r.column_idx) AS error_type, "
                    f"arg_min(r.error_message, r.column_idx) AS error, arg_min(r.csv_line, r.column_idx) AS csv_line "
                    f"FROM {table} AS r JOIN {table}_scan AS s USING (scan_id, file_id) "
                    f"GROUP BY r.file_id, r.line ORDER BY r.file_id, r.line"
                ).to_arrow_table())
        finally:
            con.close()

    def _read_again(self) -> None:
        self._rows, self.rejects = None, None
        try:
            self._read_every_row()
        except duckdb.Error as exc:
            raise self._read_error(exc) from exc

    def _read_leniently_if_mixed_line_endings(self) -> bool:
        """A CSV file that mixes '\\r\\n' and '\\n' line endings fails DuckDB's strict read; it is read in
        DuckDB's lenient mode instead, every record checked by Python's strict reader (local files
        only: a URL cannot be checked). Returns whether the read should be tried again so."""
        d = self._dialect
        if not self.is_csv or d is None or d.lenient or any(f.is_url for f in self.files):
            return False
        for f in self.files:
            with gzip_read_errors(f.name):
                where = mixed_line_endings(f.path, self._text(f))
            if where is not None:
                where = where if len(self.files) == 1 else f"{f.name}: {where}"
                self._dialect = dataclasses.replace(d, mixed_line_endings=where)
                return True
        return False

    def _read_error(self, exc: duckdb.Error) -> BatchLLMError:
        """DuckDB's error reading the input, as the user's error: a full temp directory (DuckDB spilling)
        is temporary (exit 75); anything else is the input's, with the fix it likely needs."""
        full = temp_full_error(exc)
        if full is not None:
            return full
        hint = " Fix the file, or pass --skip-bad-rows to reject bad lines." if self.is_csv else ""
        if self.is_csv and "Invalid unicode" in str(exc) and self.options.encoding is None:
            hint = (" If the file is in another encoding, name it with --encoding (latin-1, cp1252, utf-16, "
                    "...); else fix the file, or pass --skip-bad-rows to reject bad lines.")
        elif self._dialect is not None and self._dialect.lenient:
            hint = f" Fix the file (--skip-bad-rows cannot skip records in {self._dialect.lenient_reason()})."
        return InputError(f"Cannot read {self.path}: {self._reason(exc).rstrip('.')}.{hint}")
