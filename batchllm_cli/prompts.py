"""Rows -> prompt text -> token ids, in batches, in row order.

Shared by `run` and `analyze`: both need exactly the same token ids for a row, so the rules (chat
template or not, special tokens or not) live here once.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa

from batchllm_cli.table_io import ROW_ID, TableSource
from batchllm_cli.templates import PromptTemplate, PromptTooLong, RowRenderError


class TokenizerLike(Protocol):
    """The slice of engine.tokenizer.Tokenizer the CLI uses (kept structural: no engine import here)."""

    @property
    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, user_message: str) -> str: ...

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]: ...

    # engine.tokenizer.Tokenizer.max_chars_per_token (optional): no token covers more characters.


TRUNCATE_SIDES = ("left", "right")


@dataclass(frozen=True)
class PromptRow:
    row_id: int
    token_ids: list[int]
    truncated: bool = False


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


_TOO_LONG_FIX = "shorten the row, lower --max-tokens, or pass --truncate left|right."


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
    truncated: np.ndarray | None = None  # bool (n,): cut by `fit_packed`; None: none was

    def truncated_mask(self) -> np.ndarray:
        return self.truncated if self.truncated is not None else np.zeros(len(self.row_ids), dtype=bool)


def fit_packed(
    prompts: PackedPrompts, max_prompt_tokens: int, truncate: str | None
) -> tuple[PackedPrompts, int]:
    """`fit_prompt` for a packed batch: (the batch with too-long rows cut or moved to `failed`,
    number of rows cut)."""
    lengths = prompts.lengths
    long = lengths > max_prompt_tokens
    if not long.any():
        return prompts, 0
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    failed = list(prompts.failed)
    if truncate in TRUNCATE_SIDES:
        keep = np.ones(len(lengths), dtype=bool)
        new_len = np.minimum(lengths, max_prompt_tokens)
        if truncate == "left":
            starts = starts + (lengths - new_len)
        cut = int(long.sum())
    else:
        keep = ~long
        new_len = lengths
        failed.extend(_too_long(int(r), int(n), max_prompt_tokens) for r, n in zip(prompts.row_ids[long], lengths[long]))
        failed.sort(key=lambda f: f.row_id)
        cut = 0
    starts, new_len = starts[keep], new_len[keep]
    # Source index of every kept token: its row's (new) start plus its index within the row.
    total = int(new_len.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(new_len) - new_len, new_len)
    tokens = prompts.tokens[np.repeat(starts, new_len) + within]
    return PackedPrompts(prompts.row_ids[keep], tokens, new_len, failed, long[keep] if cut else None), cut


class PromptEncoder:
    """Renders a template per row and tokenizes a whole batch of prompts in one tokenizer call.

    With `chat`, the rendered text becomes one user turn of the model's chat template, whose text
    already carries BOS and role markers, so it is encoded without adding special tokens again.

    With `max_prompt_tokens`, a prompt too long in characters to fit that many tokens (by the
    tokenizer's max_chars_per_token) is never tokenized, so one huge cell costs no more than its text:
    it fails as too long, or with `truncate` is cut to one character more than can fit (still too
    long in tokens, so `fit_prompt`/`fit_packed` then cut its tokens and count it as truncated).
    """

    def __init__(
        self,
        template: PromptTemplate,
        tokenizer: TokenizerLike,
        chat: bool,
        max_prompt_tokens: int | None = None,
        truncate: str | None = None,
    ) -> None:
        if chat and not tokenizer.has_chat_template:
            raise ValueError("chat=True needs a tokenizer with a chat template")
        self.template = template
        self.tokenizer = tokenizer
        self.chat = chat
        self.truncate = truncate
        self.max_prompt_tokens = max_prompt_tokens
        per_token = getattr(tokenizer, "max_chars_per_token", None)
        self.max_chars = per_token * max_prompt_tokens if per_token and max_prompt_tokens else None
        self._variables = template.required_variables | template.optional_variables

    def prompt_text(self, rendered: str) -> str:
        return self.tokenizer.apply_chat_template(rendered) if self.chat else rendered

    def render(self, batch: pa.RecordBatch) -> tuple[list[int], list[str], list[FailedRow]]:
        """(row ids, prompt texts) of the rows that render, in the batch's order, and the failures."""
        row_ids = batch.column(ROW_ID).to_pylist()
        # Only the columns the template reads are converted to Python objects: wide tables stay cheap.
        used = [name for name in batch.schema.names if name in self._variables]
        rows = batch.select(used).to_pylist() if used else [{} for _ in row_ids]
        texts: list[str] = []
        text_ids: list[int] = []
        failed: list[FailedRow] = []
        for row_id, row in zip(row_ids, rows):
            try:
                # Without --truncate a prompt past the character bound fails anyway: stop rendering there.
                rendered = self.template.render(row, self.max_chars if self.truncate is None else None)
            except PromptTooLong as exc:
                if self.truncate is None and self.max_chars is not None and self.max_prompt_tokens is not None:
                    failed.append(_too_many_chars(row_id, exc.chars, self.max_chars, self.max_prompt_tokens))
                else:
                    failed.append(FailedRow(row_id, str(exc), exc.kind))
                continue
            except RowRenderError as exc:
                failed.append(FailedRow(row_id, str(exc), exc.kind))
                continue
            try:
                text = self.prompt_text(rendered)
            except Exception as exc:  # the model's chat template failed on this row's text
                failed.append(FailedRow(row_id, f"chat template error: {' '.join(str(exc).split()) or type(exc).__name__}"))
                continue
            if self.max_chars is not None and len(text) > self.max_chars:
                if self.truncate is None:
                    assert self.max_prompt_tokens is not None
                    failed.append(_too_many_chars(row_id, len(text), self.max_chars, self.max_prompt_tokens))
                    continue
                keep = self.max_chars + 1
                text = text[-keep:] if self.truncate == "left" else text[:keep]
            texts.append(text)
            text_ids.append(row_id)
        return text_ids, texts, failed

    def encode(self, batch: pa.RecordBatch) -> list[PromptRow | FailedRow]:
        """One item per row of `batch`, in the batch's order."""
        text_ids, texts, failed = self.render(batch)
        out: list[PromptRow | FailedRow] = list(failed)
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=not self.chat) if texts else []
        out.extend(PromptRow(rid, ids) for rid, ids in zip(text_ids, encoded))
        out.sort(key=lambda item: item.row_id)
        return out

    def encode_packed(self, batch: pa.RecordBatch) -> PackedPrompts:
        """The rows of `batch` as packed token arrays (the same ids as `encode`) plus the failures."""
        text_ids, texts, failed = self.render(batch)
        special = not self.chat
        packed = getattr(self.tokenizer, "encode_batch_packed", None)
        if packed is not None:
            tokens, lengths = packed(texts, add_special_tokens=special)
        else:
            ids = self.tokenizer.encode_batch(texts, add_special_tokens=special) if texts else []
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return PackedPrompts(np.asarray(text_ids, dtype=np.int64), tokens, lengths, failed)


def iter_prompts(
    source: TableSource, encoder: PromptEncoder, batch_rows: int = 1024
) -> Iterator[PromptRow | FailedRow]:
    """Every row of `source` as token ids or a render failure, in row order, batch by batch."""
    for batch in source.batches(batch_rows):
        yield from encoder.encode(batch)
