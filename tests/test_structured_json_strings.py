"""--json-schema answers are strict JSON: a string with minLength/maxLength holds no raw control character
(xgrammar's own rule for it let U+0000-U+001F in, and no escape), escapes stay allowed and count as one
character, and the answer is checked with a strict parser."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from batchllm_cli.structured_output import answer_error, schema_constraint
from engine.grammar import StructuredOutput, answer_matches
from reliability_utils import invoke, read_jsonl, write_rows_csv, write_template

BOUNDED = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
           "additionalProperties": False}


def _matches(schema: dict, value: str) -> bool:
    return answer_matches(StructuredOutput("json_schema", json.dumps(schema)), value)


@pytest.mark.parametrize("string", [
    {"type": "string", "maxLength": 3},
    {"type": "string", "minLength": 3},
    {"type": "string", "minLength": 3, "maxLength": 3},
    {"type": ["string", "null"], "maxLength": 3},
    {"type": "string"},  # xgrammar's unbounded rule was right already: it stays so
])
def test_a_string_holds_only_what_json_allows(string: dict) -> None:
    schema = {"type": "object", "properties": {"a": string}, "required": ["a"]}
    for raw in ("\x01", "\t", "\x1f", "\x00"):
        assert not _matches(schema, f'{{"a": "x{raw}y"}}'), repr(raw)
    for escaped in (r"\t", r"\n", r"\u0009", r"\"", "\\\\", r"\/", "é", "😀", r"\ud83d\ude00"):
        assert _matches(schema, f'{{"a": "x{escaped}y"}}'), escaped
    assert not _matches(schema, r'{"a": "x\qy"}')


def test_a_bounded_string_counts_an_escape_as_one_character() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 3}},
              "required": ["a"]}
    for value, ok in ((r"x\ny", True), (r"\t\t\t", True), (r"\u0009\u000a", True), (r"\ud83d\ude00z", True),
                      (r"\n\n\n\n", False), (r"\t", False), (r"x\ud83dy", False)):  # a lone surrogate is no character
        assert _matches(schema, f'{{"a": "{value}"}}') is ok, value
    nested = {"type": "object", "properties": {"g": {"type": "object", "propertyNames": {"maxLength": 2},
                                                     "additionalProperties": {"type": "array", "items": {
                                                         "type": "string", "maxLength": 1}}}}}
    assert _matches(nested, r'{"g": {"\n\t": ["\u0001"]}}')
    assert not _matches(nested, '{"g": {"\x01": ["x"]}}') and not _matches(nested, '{"g": {"x": ["\x01"]}}')


def test_an_answer_with_a_raw_control_character_is_an_error_row() -> None:
    constraint = schema_constraint(BOUNDED)
    assert answer_error(constraint, '{"a": "x\\ty"}', "stop") is None
    assert answer_error(constraint, '{"a": "x\ty"}', "stop") is not None


def test_answers_of_a_model_that_writes_control_characters_are_strict_json(
    tmp_path: Path, tiny_model_dir: Callable[[str], Path]
) -> None:
    """The tiny random Llama fills bounded strings with control characters when the grammar lets it
    (7 of these 40 rows before the fix)."""
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(BOUNDED), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    result = invoke(["run", str(write_rows_csv(tmp_path / "in.csv", 40)), "-t", str(write_template(tmp_path / "t.j2")),
                     "-m", str(tiny_model_dir("llama_gqa")), "--max-tokens", "40", "--json-schema", str(schema),
                     "-o", str(out), "--kv-cache-memory", "16MiB", "-q"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert len(rows) == 40
    for row in rows:
        value = json.loads(row["response"])  # strict: raises on a raw control character
        assert set(value) == {"a"} and len(value["a"]) <= 8 and row["response_a"] == value["a"]
