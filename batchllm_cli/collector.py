"""Per-row results between the engine and the next committed shard.

Rows are buffered as one tuple each (a single list append, so an interrupt can never leave half a row)
and drained into an Arrow table with the shard schema when the job commits a shard. The output column
names (`--column`) are applied only when the final output is written, so shards do not depend on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from batchllm_cli.structured_output import INCOMPLETE, Constraint, answer_error
from batchllm_cli.table_io import ROW_ID

# How many failed rows the report quotes; the output table and the errors file have all of them.
MAX_QUOTED_ERRORS = 5

# Result columns as stored in shards (internal names, independent of --column).
SHARD_SCHEMA = pa.schema(
    [
        pa.field(ROW_ID, pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("error", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("truncated", pa.bool_()),
    ]
)

# Error types in the errors file.
ERROR_TYPES = ("template_error", "null_value", "prompt_too_long", "engine_error", INCOMPLETE)


class ResultLike(Protocol):
    """The fields of engine.results.GenerationResult that the CLI reads."""

    key: object
    text: str
    finish_reason: str
    prompt_tokens: int
    error: str | None
    refused: bool  # an error row the engine refused before computing any of it
    prefix_hit_tokens: int  # of its prompt tokens, those reused instead of computed
    stop_string: str | None  # the --stop string that ended the answer

    @property
    def completion_tokens(self) -> int: ...


@dataclass(frozen=True)
class OutputColumns:
    """Names of the new columns, all starting with the --column name."""

    prefix: str = "response"

    @property
    def text(self) -> str:
        return self.prefix

    @property
    def finish_reason(self) -> str:
        return f"{self.prefix}_finish_reason"

    @property
    def prompt_tokens(self) -> str:
        return f"{self.prefix}_prompt_tokens"

    @property
    def completion_tokens(self) -> str:
        return f"{self.prefix}_completion_tokens"

    @property
    def error(self) -> str:
        return f"{self.prefix}_error"

    @property
    def names(self) -> list[str]:
        return [self.text, self.finish_reason, self.prompt_tokens, self.completion_tokens, self.error]

    def from_shards(self) -> list[tuple[str, str]]:
        """(shard column, output column) pairs, in output order."""
        return list(zip(["text", "finish_reason", "prompt_tokens", "completion_tokens", "error"], self.names))


class ResultCollector:
    """Buffered row results with running totals for progress and the report."""

    def __init__(self, columns: OutputColumns | None = None, constraint: Constraint | None = None) -> None:
        self.columns = columns or OutputColumns()
        self.constraint = constraint
        self._buffer: list[tuple] = []
        self.rows = 0
        self.rows_ok = 0
        self.rows_failed = 0
        self.rows_truncated = 0
        self.rows_run = 0  # rows the engine ran (not those it refused, nor those failed before it)
        self.prompt_tokens = 0  # of the rows the engine ran (not those it refused)
        self.prefix_hit_tokens = 0  # of those prompt tokens, reused instead of computed
        self.completion_tokens = 0
        self.first_errors: list[tuple[int, str]] = []

    @property
    def pending(self) -> int:
        """Rows buffered since the last drain."""
        return len(self._buffer)

    def _append(self, row: tuple) -> None:
        self._buffer.append(row)  # one append: an interrupt lands before or after, never half-way
        row_id, error, truncated = row[0], row[5], row[7]
        self.rows += 1
        if error is None:
            self.rows_ok += 1
        else:
            self.rows_failed += 1
            if len(self.first_errors) < MAX_QUOTED_ERRORS:
                self.first_errors.append((row_id, error))
        if truncated:
            self.rows_truncated += 1

    def add_failure(self, row_id: int, error: str, kind: str = "template_error") -> None:
        """A row that never reached the engine (its template did not render, its prompt is too long)."""
        self._append((row_id, None, "error", None, 0, error, kind, False))

    def add_result(self, result: ResultLike, row_id: int | None = None, truncated: bool = False) -> None:
        if row_id is None:
            row_id = int(result.key)  # type: ignore[call-overload]  # ordinal keys
        completion = result.completion_tokens
        if not result.refused:  # a row the engine refused was never computed (a NaN row was)
            self.rows_run += 1
            self.prompt_tokens += result.prompt_tokens
            self.prefix_hit_tokens += result.prefix_hit_tokens
        self.completion_tokens += completion
        if result.finish_reason == "error":
            error = result.error or "the engine could not run this row"
            self._append((row_id, None, "error", result.prompt_tokens, completion, error, "engine_error", truncated))
        elif self.constraint is not None and (
            (incomplete := answer_error(self.constraint, result.text, result.finish_reason, result.stop_string)) is not None
        ):
            # the partial answer stays in the text column; typed columns get nothing from an error row
            row = (row_id, result.text, result.finish_reason, result.prompt_tokens, completion, incomplete, INCOMPLETE)
            self._append((*row, truncated))
        else:
            self._append(
                (row_id, result.text, result.finish_reason, result.prompt_tokens, completion, None, None, truncated)
            )

    def drain(self) -> pa.Table:
        """The buffered rows as a table with SHARD_SCHEMA, sorted by row id; the buffer is emptied."""
        rows, self._buffer = self._buffer, []
        rows.sort(key=lambda r: r[0])
        cols = list(zip(*rows)) if rows else [[] for _ in SHARD_SCHEMA]
        return pa.table([pa.array(c, f.type) for c, f in zip(cols, SHARD_SCHEMA)], schema=SHARD_SCHEMA)

    def to_arrow(self) -> pa.Table:
        """Everything buffered, under the output column names (for library users without checkpoints)."""
        table = self.drain()
        pairs = self.columns.from_shards()
        return pa.table([table.column(ROW_ID)] + [table.column(a) for a, _ in pairs],
                        names=[ROW_ID] + [b for _, b in pairs])
