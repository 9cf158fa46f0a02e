"""Rows -> prompt text -> token ids, in batches, in row order.

Shared by `run` and `analyze`: both need exactly the same token ids for a row, so the rules (chat
template or not, special tokens or not) live here once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa

from batchllm_cli.column_fit import fit_cells
from batchllm_cli.table_io import ROW_ID, TableSource
from batchllm_cli.templates import PromptTemplate, PromptTooLong, RowRenderError


class TokenizerLike(Protocol):
    """The slice of engine.tokenizer.Tokenizer the CLI uses (kept structural: no engine import here)."""

    @property
    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, user_message: str, system: str | None = None) -> str: ...

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]: ...

    def token_ends(self, text: str) -> list[int]: ...  # used by --truncate-column only

    # engine.tokenizer.Tokenizer.max_chars_per_token (optional): no token covers more characters.


TRUNCATE_SIDES = ("left", "right")


@dataclass(frozen=True)
class PromptRow:
    row_id: int
    token_ids: list[int]
    truncated: bool = False
    text: str = field(default="", compare=False, repr=False)  # the prompt text the ids encode


@dataclass(frozen=True)
class FailedRow:
    row_id: int
    error: str
    kind: str = "template_error"  # template_error, null_value or prompt_too_long


def fit_prompt(item: PromptRow, max_prompt_tokens: int, truncate: str | None) -> PromptRow | FailedRow:
    """The row's prompt if it leaves room for the answer in the model's context, else an error row,
    or (with `truncate`) the prompt cut to fit: "left" drops its beginning, "right" its end."""
    n = len(item.token_ids)
    if n <= max_prompt_tokens:
        return item
    if truncate == "left":
        return PromptRow(item.row_id, item.token_ids[n - max_prompt_tokens :], truncated=True)
    if truncate == "right":
        return PromptRow(item.row_id, item.token_ids[:max_prompt_tokens], truncated=True)
    return _too_long(item.row_id, n, max_prompt_tokens)


_TOO_LONG_FIX = "shorten the row, lower --max-tokens, or pass --truncate-column COL or --truncate left|right."


def _too_long(row_id: int, n: int, max_prompt_tokens: int) -> FailedRow:
    return FailedRow(
        row_id,
        f"prompt too long: {n} tokens, but at most {max_prompt_tokens} fit (the model's context minus "
        f"--max-tokens); {_TOO_LONG_FIX}",
        kind="prompt_too_long",
    )


def _too_many_chars(row_id: int, n: int, max_chars: int, max_prompt_tokens: int) -> FailedRow:
    return FailedRow(
        row_id,
        f"prompt too long: {n} characters, more than the {max_prompt_tokens} tokens that fit (the model's "
        f"context minus --max-tokens) can hold with this tokenizer (at most {max_chars} characters); "
        f"{_TOO_LONG_FIX}",
        kind="prompt_too_long",
    )


@dataclass(frozen=True)
class PackedPrompts:
    """Token ids of a batch's rendered rows, packed: row `row_ids[i]` has `lengths[i]` tokens,
    consecutive in `tokens` (int32); rows whose template failed are in `failed`."""

    row_ids: np.ndarray  # int64 (n,), ascending
    tokens: np.ndarray  # int32 (lengths.sum(),)
    lengths: np.ndarray  # int64 (n,)
    failed: list[FailedRow]
    truncated: np.ndarray | None = None  # bool (n,): cut (--truncate-column, or --truncate by fit_packed)

    def truncated_mask(self) -> np.ndarray:
        return self.truncated if self.truncated is not None else np.zeros(len(self.row_ids), dtype=bool)


def fit_packed(
    prompts: PackedPrompts, max_prompt_tokens: int, truncate: str | None
) -> tuple[PackedPrompts, int]:
    """`fit_prompt` for a packed batch: (the batch with too-long rows cut or moved to `failed`,
    number of rows cut)."""
    lengths = prompts.lengths
    long = lengths > max_prompt_tokens
    columns_cut = prompts.truncated if prompts.truncated is not None else np.zeros(len(lengths), dtype=bool)
    if not long.any():
        return prompts, int(columns_cut.sum())
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    failed = list(prompts.failed)
    if truncate in TRUNCATE_SIDES:
        keep = np.ones(len(lengths), dtype=bool)
        new_len = np.minimum(lengths, max_prompt_tokens)
        if truncate == "left":
            starts = starts + (lengths - new_len)
        cut = int((long | columns_cut).sum())
    else:
        keep = ~long
        new_len = lengths
        failed.extend(_too_long(int(r), int(n), max_prompt_tokens) for r, n in zip(prompts.row_ids[long], lengths[long]))
        failed.sort(key=lambda f: f.row_id)
        cut = int((columns_cut & keep).sum())
    starts, new_len = starts[keep], new_len[keep]
    # Source index of every kept token: its row's (new) start plus its index within the row.
    total = int(new_len.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(new_len) - new_len, new_len)
    tokens = prompts.tokens[np.repeat(starts, new_len) + within]
    cut_rows = (long | columns_cut) if truncate in TRUNCATE_SIDES else columns_cut
    return PackedPrompts(prompts.row_ids[keep], tokens, new_len, failed, cut_rows[keep]), cut


def _is_nanosecond_time(t: pa.DataType) -> bool:
    return (pa.types.is_timestamp(t) or pa.types.is_time64(t)) and t.unit == "ns"


def _row_dicts(batch: pa.RecordBatch, decoders: Mapping[str, Callable[[Any], Any]]) -> list[dict[str, Any]]:
    """The batch's rows as {column: Python value}: maps as dicts, nanosecond times as their text (Python's
    datetime holds microseconds, and refuses to drop the rest), 32-bit floats as the float their shortest
    text spells, and JSON texts nested in lists and structs as the values they spell
    (`decoders`, by column)."""
    names = batch.schema.names
    columns = []
    for name, column in zip(names, batch.columns):
        if _is_nanosecond_time(column.type):
            column = column.cast(pa.string())
        if pa.types.is_float32(column.type):
            # the shortest text that reads back as the same float32 (1.1), not float64's 1.100000023841858
            values = [None if v is None else float(v) for v in column.cast(pa.string()).to_pylist()]
        else:
            values = column.to_pylist(maps_as_pydicts="lossy")
        decode = decoders.get(name)
        columns.append(values if decode is None else [decode(v) for v in values])
    return [dict(zip(names, row)) for row in zip(*columns)]


class PromptEncoder:
    """Renders a template per row and tokenizes a whole batch of prompts in one tokenizer call.

    With `chat`, the rendered text becomes one user turn of the model's chat template (after a system
    turn holding `system`, when given), whose text already carries BOS and role markers, so it is
    encoded without adding special tokens again.

    With `max_prompt_tokens`, a prompt too long in characters to fit that many tokens (by the
    tokenizer's max_chars_per_token) is never tokenized, so one huge cell costs no more than its text:
    it fails as too long, or with `truncate` is cut to one character more than can fit (still too
    long in tokens, so `fit_prompt`/`fit_packed` then cut its tokens and count it as truncated).

    With `truncate_columns`, a prompt longer than `max_prompt_tokens` is rendered again with the text
    of those columns cut (by tokens, from the end, the longest column first) as little as lets it fit
    (batchllm_cli/column_fit.py), so the instructions and the chat turn stay whole. Their cells are first cut to the character bound (no
    longer text could fit). A prompt still too long once they are empty fails as too long, or with
    `truncate` is left for `fit_prompt`/`fit_packed` to cut.
    """

    def __init__(
        self,
        template: PromptTemplate,
        tokenizer: TokenizerLike,
        chat: bool,
        max_prompt_tokens: int | None = None,
        truncate: str | None = None,
        *,
        system: str | None = None,
        truncate_columns: Sequence[str] = (),
        decoders: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        if chat and not tokenizer.has_chat_template:
            raise ValueError("chat=True needs a tokenizer with a chat template")
        if system is not None and not chat:
            raise ValueError("a system message needs chat=True")
        self.template = template
        self.tokenizer = tokenizer
        self.chat = chat
        self.system = system
        self.truncate = truncate
        self.max_prompt_tokens = max_prompt_tokens
        self.truncate_columns = tuple(truncate_columns) if max_prompt_tokens is not None else ()
        self.decoders = dict(decoders or {})  # column -> its nested JSON texts to values (TableSource.json_decoders)
        per_token = getattr(tokenizer, "max_chars_per_token", None)
        self.max_chars = per_token * max_prompt_tokens if per_token and max_prompt_tokens else None

    def prompt_text(self, rendered: str) -> str:
        return self.tokenizer.apply_chat_template(rendered, system=self.system) if self.chat else rendered

    def _rows(self, batch: pa.RecordBatch) -> tuple[list[int], list[dict[str, Any]], set[int]]:
        """(row ids, the columns each row's template reads, ids of rows whose --truncate-column cells
        were cut to the character bound)."""
        row_ids = batch.column(ROW_ID).to_pylist()
        # Only the columns the template reads are converted to Python objects: wide tables stay cheap.
        used = self.template.columns_read([name for name in batch.schema.names if name != ROW_ID])
        rows = _row_dicts(batch.select(used), self.decoders) if used else [{} for _ in row_ids]
        cut: set[int] = set()
        if self.truncate_columns and self.max_chars is not None:
            for row_id, row in zip(row_ids, rows):
                for name in self.truncate_columns:
                    value = row.get(name)
                    if isinstance(value, str) and len(value) > self.max_chars:
                        row[name] = value[: self.max_chars]
                        cut.add(row_id)
        return row_ids, rows, cut

    def _prompt(self, row_id: int, row: dict[str, Any]) -> str | FailedRow:
        """The prompt text of one row, or why it has none."""
        # Without a way to cut, a prompt past the character bound fails anyway: stop rendering there.
        cuts = self.truncate is not None or bool(self.truncate_columns)
        try:
            rendered = self.template.render(row, None if cuts else self.max_chars)
        except PromptTooLong as exc:
            if not cuts and self.max_chars is not None and self.max_prompt_tokens is not None:
                return _too_many_chars(row_id, exc.chars, self.max_chars, self.max_prompt_tokens)
            return FailedRow(row_id, str(exc), exc.kind)
        except RowRenderError as exc:
            return FailedRow(row_id, str(exc), exc.kind)
        try:
            text = self.prompt_text(rendered)
        except Exception as exc:  # the model's chat template failed on this row's text
            return FailedRow(row_id, f"chat template error: {' '.join(str(exc).split()) or type(exc).__name__}")
        if self.max_chars is not None and len(text) > self.max_chars and not self.truncate_columns:
            if self.truncate is None:
                assert self.max_prompt_tokens is not None
                return _too_many_chars(row_id, len(text), self.max_chars, self.max_prompt_tokens)
            keep = self.max_chars + 1
            text = text[-keep:] if self.truncate == "left" else text[:keep]
        return text

    def _render(
        self, batch: pa.RecordBatch
    ) -> tuple[list[int], list[str], list[dict[str, Any]], list[FailedRow], set[int]]:
        row_ids, rows, cut = self._rows(batch)
        text_ids: list[int] = []
        texts: list[str] = []
        kept: list[dict[str, Any]] = []
        failed: list[FailedRow] = []
        for row_id, row in zip(row_ids, rows):
            prompt = self._prompt(row_id, row)
            if isinstance(prompt, FailedRow):
                failed.append(prompt)
                continue
            text_ids.append(row_id)
            texts.append(prompt)
            kept.append(row)
        return text_ids, texts, kept, failed, cut

    def render(self, batch: pa.RecordBatch) -> tuple[list[int], list[str], list[FailedRow]]:
        """(row ids, prompt texts) of the rows that render, in the batch's order, and the failures."""
        text_ids, texts, _, failed, _ = self._render(batch)
        return text_ids, texts, failed

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=not self.chat) if texts else []

    def encode(self, batch: pa.RecordBatch) -> list[PromptRow | FailedRow]:
        """One item per row of `batch`, in the batch's order."""
        text_ids, texts, rows, failed, cut = self._render(batch)
        out: list[PromptRow | FailedRow] = list(failed)
        for row_id, text, row, ids in zip(text_ids, texts, rows, self._encode(texts)):
            if self.truncate_columns and (len(ids) > (self.max_prompt_tokens or 0) or row_id in cut):
                out.append(self._fit_columns(row_id, row, ids, text))
            else:
                out.append(PromptRow(row_id, ids, text=text))
        out.sort(key=lambda item: item.row_id)
        return out

    def _fit_columns(self, row_id: int, row: dict[str, Any], ids: list[int], text: str) -> PromptRow | FailedRow:
        """The row rendered again with its --truncate-column cells cut as little as lets the prompt fit."""
        limit = self.max_prompt_tokens
        assert limit is not None
        if len(ids) <= limit:  # its cells were cut to the character bound only
            return PromptRow(row_id, ids, truncated=True, text=text)
        names = [name for name in self.truncate_columns if isinstance(row.get(name), str) and row[name]]
        # Where each token of a cell ends (a running max: a character split over tokens ends once).
        cells = {name: (row[name], list(accumulate(self.tokenizer.token_ends(row[name]), max))) for name in names}

        def render(cut: dict[str, str]) -> tuple[str, list[int]] | FailedRow:
            prompt = self._prompt(row_id, {**row, **cut})
            return prompt if isinstance(prompt, FailedRow) else (prompt, self._encode([prompt])[0])

        fitted = fit_cells(cells, limit, (text, ids), render)
        if isinstance(fitted, FailedRow):
            return fitted
        (text, ids), fits = fitted
        if not fits and self.truncate is None:
            emptied = ", ".join(self.truncate_columns)
            return FailedRow(
                row_id,
                f"prompt too long: {len(ids)} tokens with --truncate-column {emptied} emptied, but at most {limit} "
                "fit (the model's context minus --max-tokens); shorten the template or the other columns, lower "
                "--max-tokens, or pass --truncate left|right.",
                kind="prompt_too_long",
            )
        return PromptRow(row_id, ids, truncated=True, text=text)

    def encode_packed(self, batch: pa.RecordBatch) -> PackedPrompts:
        """The rows of `batch` as packed token arrays (the same ids as `encode`) plus the failures."""
        if self.truncate_columns:
            items = self.encode(batch)
            rows = [item for item in items if isinstance(item, PromptRow)]
            lengths = np.fromiter((len(r.token_ids) for r in rows), dtype=np.int64, count=len(rows))
            tokens = np.fromiter(chain.from_iterable(r.token_ids for r in rows), dtype=np.int32,
                                 count=int(lengths.sum()))
            return PackedPrompts(
                np.fromiter((r.row_id for r in rows), dtype=np.int64, count=len(rows)), tokens, lengths,
                [item for item in items if isinstance(item, FailedRow)],
                np.fromiter((r.truncated for r in rows), dtype=bool, count=len(rows)),
            )
        text_ids, texts, failed = self.render(batch)
        special = not self.chat
        packed = getattr(self.tokenizer, "encode_batch_packed", None)
        if packed is not None:
            tokens, lengths = packed(texts, add_special_tokens=special)
        else:
            ids = self._encode(texts)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return PackedPrompts(np.asarray(text_ids, dtype=np.int64), tokens, lengths, failed)


def iter_prompts(
    source: TableSource, encoder: PromptEncoder, batch_rows: int = 1024
) -> Iterator[PromptRow | FailedRow]:
    """Every row of `source` as token ids or a render failure, in row order, batch by batch."""
    for batch in source.batches(batch_rows):
        yield from encoder.encode(batch)
