"""--truncate-column cuts a cell as little as lets the prompt fit, also where one cell token costs several
prompt tokens (`| tojson` on non-ASCII text, a column printed twice) or fewer; several columns are cut
longest first, down to a common length; a row needing a cut takes O(log n) renders."""
from __future__ import annotations

import random
from itertools import accumulate

import pyarrow as pa
import pytest

import model_factory
from batchllm_cli.column_fit import fit_cells
from batchllm_cli.prompts import FailedRow, PromptEncoder, PromptRow
from batchllm_cli.table_io import ROW_ID
from batchllm_cli.templates import PromptTemplate, TemplateSource
from engine.tokenizer import Tokenizer

ACCENTED = " ".join(["café naïve résumé"] * 8)
PLAIN = "the farmer walked to the house in the morning and the student sat on the mat with three cats"


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting its encode_batch calls (one per render while fitting a row)."""

    calls = 0

    def encode_batch(self, texts, *, add_special_tokens=True):  # noqa: ANN001, ANN201
        self.calls += 1
        return super().encode_batch(texts, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CountingTokenizer:
    """The test models' tokenizer (byte-level BPE, the one the bug report's Llama used), with a chat template."""
    out = tmp_path_factory.mktemp("tok")
    model_factory.write_tokenizer(out, chat_template_file=True)
    return CountingTokenizer(out)


def _encoder(tokenizer: Tokenizer, source: str, limit: int, columns: tuple[str, ...] = ("text",)) -> PromptEncoder:
    return PromptEncoder(PromptTemplate(TemplateSource("t.j2", source)), tokenizer, chat=True,
                         max_prompt_tokens=limit, truncate_columns=columns)


def _batch(**columns: list[str]) -> pa.RecordBatch:
    n = len(next(iter(columns.values())))
    return pa.record_batch({ROW_ID: pa.array(range(n), pa.int64()), **columns})


def _prefixes(tokenizer: Tokenizer, cell: str) -> list[str]:
    """The cell cut after each of its tokens: "", its first token, ..., the whole cell."""
    return ["", *(cell[:end] for end in accumulate(tokenizer.token_ends(cell), max))]


def _tokens(encoder: PromptEncoder, row: dict[str, str]) -> list[int]:
    return encoder.tokenizer.encode_batch([encoder.prompt_text(encoder.template.render(row))],
                                          add_special_tokens=False)[0]


def _kept_tokens(encoder: PromptEncoder, item: PromptRow, name: str, cell: str, row: dict[str, str]) -> int:
    """How many of the cell's tokens the fitted prompt kept (the cut whose prompt is the item's)."""
    cuts = [k for k, prefix in enumerate(_prefixes(encoder.tokenizer, cell))
            if _tokens(encoder, {**row, name: prefix}) == item.token_ids]
    assert cuts, "the fitted prompt is no cut of the cell"
    return cuts[-1]


@pytest.mark.parametrize(("source", "cell", "limit"), [
    ("Data: {{ text | tojson }}", ACCENTED, 112),  # é is \u00e9: six prompt tokens for a cell token
    ("A: {{ text }}\nB: {{ text }}", PLAIN, 42),  # every cell token is in the prompt twice
])
def test_a_cell_costing_several_prompt_tokens_per_token_keeps_all_that_fits(
    tokenizer: CountingTokenizer, source: str, cell: str, limit: int
) -> None:
    encoder = _encoder(tokenizer, source, limit)
    [item] = encoder.encode(_batch(text=[cell]))
    assert isinstance(item, PromptRow) and item.truncated
    assert limit - 6 < len(item.token_ids) <= limit  # before the fix: 13 tokens, the cell cut to almost nothing
    kept = _kept_tokens(encoder, item, "text", cell, {})
    one_more = _prefixes(tokenizer, cell)[kept + 1]
    assert len(_tokens(encoder, {"text": one_more})) > limit  # the largest cut that fits


def test_random_cells_land_on_the_largest_cut_that_fits(tokenizer: CountingTokenizer) -> None:
    rng = random.Random(3)
    words = ["the", "café", "naïve", "完璧", "😀", "cat", "\"quoted\"", "line\n", "über", "a"]
    cells = ["".join(rng.choice(words) + rng.choice([" ", "", ","]) for _ in range(rng.randint(20, 120)))
             for _ in range(6)]
    for source in ("Data: {{ text | tojson }}", "A: {{ text }}\nB: {{ text }}", "Read:\n{{ text }}\nAnswer:"):
        for limit in (40, 90):
            encoder = _encoder(tokenizer, source, limit)
            for cell, item in zip(cells, encoder.encode(_batch(text=cells))):
                assert isinstance(item, PromptRow) and len(item.token_ids) <= limit
                if not item.truncated:
                    continue
                prefixes = _prefixes(tokenizer, cell)
                kept = _kept_tokens(encoder, item, "text", cell, {})
                assert kept + 1 < len(prefixes) and len(_tokens(encoder, {"text": prefixes[kept + 1]})) > limit


def test_several_columns_are_cut_longest_first_to_a_common_length(tokenizer: CountingTokenizer) -> None:
    long, short = " ".join(["alpha beta gamma"] * 12), "one two three four five six seven"
    source = "A: {{ a }}\nB: {{ b }}"
    n_long, n_short = len(tokenizer.token_ends(long)), len(tokenizer.token_ends(short))
    whole = len(_tokens(_encoder(tokenizer, source, 10_000), {"a": long, "b": short}))
    # A small cut takes tokens from the longest column only.
    encoder = _encoder(tokenizer, source, whole - 5, ("a", "b"))
    [item] = encoder.encode(_batch(a=[long], b=[short]))
    assert isinstance(item, PromptRow) and item.truncated and len(item.token_ids) == whole - 5
    assert item.text.count(short) == 1 and _kept_tokens(encoder, item, "a", long, {"b": short}) == n_long - 5
    # A cut past the shorter column's length takes both down to about the same number of tokens.
    limit = whole - (n_long - n_short) - 10
    encoder = _encoder(tokenizer, source, limit, ("a", "b"))
    [item] = encoder.encode(_batch(a=[long], b=[short]))
    assert isinstance(item, PromptRow) and limit - 2 <= len(item.token_ids) <= limit
    b_kept = item.text.split("\nB: ", 1)[1].split("<|eot|>", 1)[0]
    assert short.startswith(b_kept) and b_kept != short
    a_kept = _kept_tokens(encoder, item, "a", long, {"b": b_kept})
    assert abs(a_kept - len(tokenizer.token_ends(b_kept))) <= 1


def test_a_row_needing_a_cut_takes_few_renders_and_the_others_none(tokenizer: CountingTokenizer) -> None:
    cell = " ".join(["café naïve résumé"] * 400)  # ~3,000 tokens
    encoder = _encoder(tokenizer, "Data: {{ text | tojson }}", 1000)
    before = tokenizer.calls
    items = encoder.encode(_batch(text=["short", cell, "also short"]))
    assert all(isinstance(item, PromptRow) for item in items) and [i.truncated for i in items] == [False, True, False]
    assert tokenizer.calls - before <= 1 + 2 * 12  # the batch, then at most ~2 log2(n) renders of the long row


def test_a_prompt_too_long_with_the_column_emptied_still_fails(tokenizer: CountingTokenizer) -> None:
    encoder = _encoder(tokenizer, "Instructions " * 30 + "{{ text }}", 20)
    [item] = encoder.encode(_batch(text=[PLAIN]))
    assert isinstance(item, FailedRow) and item.kind == "prompt_too_long" and "emptied" in item.error


def test_fit_cells_passes_a_render_failure_through() -> None:
    cells = {"text": ("abcdef", [1, 2, 3, 4, 5, 6])}
    failure = FailedRow(0, "boom")
    assert fit_cells(cells, 3, ("abcdef", [0] * 10), lambda cut: failure) is failure


def test_fit_cells_finds_the_cap_with_a_prompt_cost_it_does_not_know() -> None:
    """Any monotone cost (here three prompt tokens per cell token plus seven) lands on the largest cap that fits."""
    text = "x" * 500
    cells = {"text": (text, list(range(1, 501)))}
    renders: list[int] = []

    def render(cut: dict[str, str]) -> tuple[str, list[int]]:
        renders.append(len(cut["text"]))
        return cut["text"], [0] * (7 + 3 * len(cut["text"]))

    for limit in (8, 100, 1000, 1505):
        renders.clear()
        fitted = fit_cells(cells, limit, (text, [0] * 1507), render)
        assert isinstance(fitted, tuple)
        (kept, _), fits = fitted
        assert fits and len(kept) == (limit - 7) // 3 and len(renders) <= 2 * 9 + 1
    assert fit_cells(cells, 6, (text, [0] * 1507), render) == (("", [0] * 7), False)
