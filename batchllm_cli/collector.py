"""Collects per-row results until the output is written.

Kept to one small class on purpose: checkpointing will turn it into a shard writer (flush every N
rows to a committed shard) without touching the job loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from batchllm_cli.table_io import ROW_ID

# How many failed rows the report quotes; the output table has all of them.
MAX_QUOTED_ERRORS = 5


class ResultLike(Protocol):
    """The fields of engine.results.GenerationResult that the CLI reads."""

    key: object
    text: str
    finish_reason: str
    prompt_tokens: int
    error: str | None

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


class ResultCollector:
    """Row results in memory, with running totals for progress and the report."""

    def __init__(self, columns: OutputColumns) -> None:
        self.columns = columns
        self._row_ids: list[int] = []
        self._text: list[str | None] = []
        self._finish: list[str] = []
        self._prompt_tokens: list[int | None] = []
        self._completion_tokens: list[int] = []
        self._error: list[str | None] = []
        self.rows_ok = 0
        self.rows_failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_errors: list[tuple[int, str]] = []

    @property
    def rows(self) -> int:
        return len(self._row_ids)

    def _append(
        self, row_id: int, text: str | None, finish: str, prompt: int | None, completion: int, error: str | None
    ) -> None:
        self._row_ids.append(row_id)
        self._text.append(text)
        self._finish.append(finish)
        self._prompt_tokens.append(prompt)
        self._completion_tokens.append(completion)
        self._error.append(error)
        if error is None:
            self.rows_ok += 1
        else:
            self.rows_failed += 1
            if len(self.first_errors) < MAX_QUOTED_ERRORS:
                self.first_errors.append((row_id, error))

    def add_failure(self, row_id: int, error: str) -> None:
        """A row that never reached the engine (its template did not render)."""
        self._append(row_id, None, "error", None, 0, error)

    def add_result(self, result: ResultLike) -> None:
        row_id = int(result.key)  # type: ignore[call-overload]  # the job uses row ids as keys
        completion = result.completion_tokens
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += completion
        if result.finish_reason == "error":
            error = result.error or "the engine could not run this row"
            self._append(row_id, None, "error", result.prompt_tokens, completion, error)
        else:
            self._append(row_id, result.text, result.finish_reason, result.prompt_tokens, completion, None)

    def to_arrow(self) -> pa.Table:
        c = self.columns
        return pa.table(
            {
                ROW_ID: pa.array(self._row_ids, pa.int64()),
                c.text: pa.array(self._text, pa.string()),
                c.finish_reason: pa.array(self._finish, pa.string()),
                c.prompt_tokens: pa.array(self._prompt_tokens, pa.int64()),
                c.completion_tokens: pa.array(self._completion_tokens, pa.int64()),
                c.error: pa.array(self._error, pa.string()),
            }
        )
