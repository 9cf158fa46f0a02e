"""A prompt too long in characters to fit the context is never tokenized: a huge cell costs its text, not
gigabytes of token encodings; with --truncate it is cut to the character bound first and then exactly
as before. The bound (Tokenizer.max_chars_per_token) must never reject a prompt that would fit."""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import model_factory
from batchllm_cli.prompts import FailedRow, PromptEncoder, PromptRow, fit_prompt
from batchllm_cli.table_io import ROW_ID
from batchllm_cli.templates import PromptTemplate, TemplateSource
from engine.tokenizer import Tokenizer, _keeps_every_character, _normalizer_shrink, _unknowns_may_fuse
from reliability_utils import FAST, invoke, read_jsonl, read_rows, write_template


@pytest.fixture(scope="module")
def tokenizers(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Tokenizer]:
    """The demo model's tokenizer and the test models' (byte-level BPE trained with `tokenizers`)."""
    trained = tmp_path_factory.mktemp("tok")
    model_factory.write_tokenizer(trained, chat_template_file=False)
    return [Tokenizer(demo_model_dir), Tokenizer(trained)]


class RecordingTokenizer(Tokenizer):
    """The real tokenizer, remembering the longest text it was asked to encode."""

    longest = 0

    def encode_batch(self, texts, *, add_special_tokens=True):  # noqa: ANN001, ANN201
        self.longest = max([self.longest, *map(len, texts)])
        return super().encode_batch(texts, add_special_tokens=add_special_tokens)


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=300) | st.sampled_from(["<|begin_of_text|>" * 5, " " * 200, "\u00e9" * 100]))
def test_no_token_covers_more_characters_than_the_bound(tokenizers: list[Tokenizer], text: str) -> None:
    for tok in tokenizers:
        bound = tok.max_chars_per_token
        assert bound is not None
        assert len(tok.encode(text, add_special_tokens=False)) * bound >= len(text)


def test_tokenizers_that_may_delete_or_fuse_characters_leave_no_bound() -> None:
    assert _normalizer_shrink(None) == 1
    assert _normalizer_shrink({"type": "NFC"}) == 4
    nfkc_then_space = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    assert _normalizer_shrink(nfkc_then_space) == 4
    for deleting in ({"type": "StripAccents"}, {"type": "Strip"}, {"type": "Precompiled"}, {"type": "BertNormalizer"},
                     {"type": "Replace", "pattern": {"String": "x"}, "content": ""},
                     {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}):
        assert _normalizer_shrink(deleting) is None
        assert _normalizer_shrink({"type": "Sequence", "normalizers": [{"type": "NFC"}, deleting]}) is None
    assert _keeps_every_character({"type": "Sequence", "pretokenizers": [{"type": "Split", "behavior": "Isolated"}, {"type": "ByteLevel"}]})
    for dropping in ({"type": "Whitespace"}, {"type": "BertPreTokenizer"}, {"type": "Split", "behavior": "Removed"}):
        assert not _keeps_every_character(dropping)
    assert not _unknowns_may_fuse({"type": "BPE", "unk_token": None})
    assert not _unknowns_may_fuse({"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True})
    assert _unknowns_may_fuse({"type": "BPE", "unk_token": "<unk>", "fuse_unk": True})
    assert _unknowns_may_fuse({"type": "WordPiece"}) and _unknowns_may_fuse({"type": "Unigram"})


def test_a_prompt_over_the_bound_is_never_tokenized(demo_model_dir: Path) -> None:
    tok = RecordingTokenizer(demo_model_dir)
    max_tokens = 100
    bound = tok.max_chars_per_token * max_tokens
    batch = pa.record_batch({ROW_ID: pa.array([0, 1, 2], pa.int64()), "text": ["short", "x" * (10 * bound), "y" * bound]})
    template = PromptTemplate(TemplateSource("t.j2", "{{ text }}"))
    items = PromptEncoder(template, tok, chat=False, max_prompt_tokens=max_tokens).encode(batch)
    assert isinstance(items[0], PromptRow) and isinstance(items[2], PromptRow)
    assert isinstance(items[1], FailedRow) and items[1].kind == "prompt_too_long"
    assert f"{10 * bound} characters" in items[1].error and "--truncate" in items[1].error
    assert tok.longest == bound  # the long row never reached the tokenizer
    # Over the bound in characters means over the limit in tokens: nothing that fits is refused.
    assert len(tok.encode("x" * (10 * bound))) > max_tokens


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_cuts_characters_then_tokens_as_before(demo_model_dir: Path, side: str) -> None:
    tok = RecordingTokenizer(demo_model_dir)
    max_tokens = 200
    bound = tok.max_chars_per_token * max_tokens
    rng = random.Random(0)
    text = "".join(rng.choice("ab cd\u00e9\u65e5 xyz.") for _ in range(3 * bound))
    batch = pa.record_batch({ROW_ID: pa.array([0], pa.int64()), "text": [text]})
    template = PromptTemplate(TemplateSource("t.j2", "{{ text }}"))
    [item] = PromptEncoder(template, tok, chat=False, max_prompt_tokens=max_tokens, truncate=side).encode(batch)
    assert tok.longest == bound + 1
    assert isinstance(item, PromptRow)
    fitted = fit_prompt(item, max_tokens, side)
    whole = fit_prompt(PromptRow(0, tok.encode(text)), max_tokens, side)
    assert isinstance(fitted, PromptRow) and isinstance(whole, PromptRow)
    assert fitted.truncated and fitted.token_ids == whole.token_ids


def test_cli_json_record_past_16_mb_is_a_row_error_not_a_refused_file(tmp_path: Path, env: dict[str, str]) -> None:
    # DuckDB's default maximum_object_size (16 MB) refused the whole JSON file; CSV and Parquet took it.
    import json

    inp = tmp_path / "in.jsonl"
    big = "lorem ipsum " * 3_500_000  # 42 MB (DuckDB refused past ~32 MB)
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["hello", big, "world"])))
    out = tmp_path / "o.jsonl"
    result = invoke(["run", str(inp), "-t", str(write_template(tmp_path / "t.j2", "Say: {{ text }}")), "-o", str(out),
                     *FAST])
    assert result.exit_code == 3, result.output
    [error] = read_jsonl(out.with_name(out.name + ".errors.jsonl"))
    assert error["row"] == 1 and error["error_type"] == "prompt_too_long"
    assert len(read_rows(out)[1]["text"]) == len(big)


def test_cli_huge_cell_is_a_row_error_or_truncated(tmp_path: Path, env: dict[str, str]) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text\n1,hello\n2," + "lorem ipsum " * 100_000 + "\n3,world\n")
    tpl = write_template(tmp_path / "t.j2", "Say: {{ text }}")
    out = tmp_path / "o.csv"
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), *FAST])
    assert result.exit_code == 3, result.output
    [error] = read_jsonl(out.with_name(out.name + ".errors.jsonl"))
    assert error["row"] == 1 and error["error_type"] == "prompt_too_long" and "1200005 characters" in error["error"]
    for side in ("left", "right"):
        cut = tmp_path / f"o_{side}.csv"
        result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(cut), *FAST, "--truncate", side])
        assert result.exit_code == 0, result.output
        rows = read_rows(cut)
        assert int(rows[1]["response_prompt_tokens"]) == 2048 - 3  # the demo model's context minus --max-tokens
        assert len(rows[1]["text"]) == 1_200_000  # the input column is unchanged
