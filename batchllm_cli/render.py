"""The `render` job: the prompts `run` would send and their token counts, without model weights.

It is prepared exactly as `analyze` is (template with --var/--param, model or tokenizer, chat
template and --system, context minus --max-tokens) and renders rows with the same PromptEncoder and
fitting rules as `run`, so what it shows is what the model would read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from batchllm_cli.analyze_types import PreparedAnalyze
from batchllm_cli.prompts import FailedRow, PromptEncoder, PromptRow, fit_prompt
from batchllm_cli.table_io import ROW_ID

BATCH_ROWS = 256


@dataclass(frozen=True)
class RenderedRow:
    """One row's prompt (chat template applied) and its token count after fitting the context, or
    why it has none. With --truncate the text is the prompt before its tokens were cut."""

    row: int  # 0-based position in the input
    id: Any = None  # the --id-column value
    prompt: str | None = None
    tokens: int | None = None
    truncated: bool = False
    error: str | None = None
    error_type: str | None = None

    def to_json(self, with_id: bool) -> str:
        data: dict[str, Any] = {"row": self.row}
        if with_id:
            data["id"] = self.id if isinstance(self.id, (str, int, float, bool)) or self.id is None else str(self.id)
        if self.error is None:
            data.update(prompt=self.prompt, tokens=self.tokens)
            if self.truncated:
                data["truncated"] = True
        else:
            data.update(error=self.error, error_type=self.error_type)
        return json.dumps(data, ensure_ascii=False)

    def to_text(self, with_id: bool) -> str:
        name = f"row {self.row}" + (f" (id {self.id})" if with_id else "")
        if self.error is not None:
            return f"--- {name}: {self.error_type}: {self.error}\n"
        cut = ", cut to fit the context" if self.truncated else ""
        return f"--- {name}: {self.tokens} tokens{cut}\n{self.prompt}\n"


def render_rows(prepared: PreparedAnalyze) -> Iterator[RenderedRow]:
    """Every row of the prepared input, in order."""
    s = prepared.settings
    context = prepared.context_tokens
    max_prompt = None if context is None else context - prepared.max_tokens
    encoder = PromptEncoder(prepared.template, prepared.tokenizer, prepared.chat, max_prompt, s.truncate,
                            system=s.prompt.system, truncate_columns=s.prompt.truncate_columns,
                            decoders=prepared.source.json_decoders())
    for batch in prepared.source.batches(BATCH_ROWS):
        ids = batch.column(s.id_column).to_pylist() if s.id_column else None
        position = {row_id: i for i, row_id in enumerate(batch.column(ROW_ID).to_pylist())}
        for item in encoder.encode(batch):
            key = ids[position[item.row_id]] if ids is not None else None
            fitted = item
            if isinstance(item, PromptRow) and max_prompt is not None:
                fitted = fit_prompt(item, max_prompt, s.truncate)
            if isinstance(fitted, FailedRow):
                yield RenderedRow(fitted.row_id, key, error=fitted.error, error_type=fitted.kind)
            else:
                assert isinstance(item, PromptRow)
                yield RenderedRow(item.row_id, key, item.text, len(fitted.token_ids), fitted.truncated)
