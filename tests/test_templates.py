"""Templates and recipes: variable checks before any model, per-row render errors. No model."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

import recipes
from batchllm_cli.errors import UsageError
from batchllm_cli.prompts import FailedRow, PromptEncoder, PromptRow
from batchllm_cli.table_io import ROW_ID
from batchllm_cli.templates import PromptTemplate, RowRenderError, TemplateSource, resolve_template


def template(text: str) -> PromptTemplate:
    return PromptTemplate(TemplateSource(name="t.j2", text=text))


def test_required_and_optional_variables() -> None:
    t = template(
        "{{ a }} {{ b | default('x') }} {% if c is defined %}{{ c }}{% endif %} "
        "{% for x in items %}{{ x.name }}{% endfor %} {% set local = 1 %}{{ local }}"
    )
    assert t.required_variables == {"a", "items"}
    assert t.optional_variables == {"b", "c"}


def test_unknown_variable_lists_missing_and_available_columns() -> None:
    t = template("{{ text }} {{ titel }} {{ athor }}")
    with pytest.raises(UsageError) as info:
        t.check_columns(["text", "title", "author"])
    message = str(info.value)
    assert "athor, titel" in message
    assert "available columns: text, title, author" in message
    t.check_columns(["text", "titel", "athor"])  # all present: no error


def test_render_strict_and_nulls() -> None:
    t = template("[{{ a }}|{{ b.c }}]")
    # Default --nulls error: a null printed into the prompt makes the row an error row, naming the column.
    with pytest.raises(RowRenderError, match="null value: column a is null.*--nulls empty") as info:
        t.render({"a": None, "b": {"c": 2}})
    assert info.value.kind == "null_value"
    with pytest.raises(RowRenderError, match="null value"):
        t.render({"a": 1, "b": {"c": None}})  # a null nested in a struct too
    with pytest.raises(RowRenderError, match="null value"):
        t.render({"a": float("nan"), "b": {"c": 1}})  # NaN never becomes the word "nan"
    empty = PromptTemplate(TemplateSource(name="t.j2", text="[{{ a }}|{{ b.c }}]"), nulls="empty")
    assert empty.render({"a": None, "b": {"c": 2}}) == "[|2]"
    assert empty.render({"a": float("nan"), "b": {"c": None}}) == "[|]"
    with pytest.raises(RowRenderError, match="template error") as info:
        t.render({"a": 1, "b": {}})  # missing key in a struct: StrictUndefined
    assert info.value.kind == "template_error"
    several = template("{{ meta }} {{ ok }} {{ x }}")  # was "column meta, ok is null"
    with pytest.raises(RowRenderError, match="null value: columns meta and ok are null in this row"):
        several.render({"meta": None, "ok": None, "x": 1})
    with pytest.raises(RowRenderError, match="null value: columns meta, ok and x are null in this row"):
        several.render({"meta": None, "ok": float("nan"), "x": None})


@pytest.mark.parametrize("nulls", ["error", "empty"])
def test_text_written_as_json_writes_null_under_either_policy(nulls: str) -> None:
    """`{{ row }}`, `| tojson` and list/struct cells are JSON: a null there is JSON's null, not a hole."""
    t = PromptTemplate(TemplateSource(name="t.j2", text="{{ row }} {{ b | tojson }} {{ items }}"), nulls=nulls)
    row = {"a": "x", "b": None, "items": [1, None]}
    assert t.render(row) == '{"a": "x", "b": null, "items": [1, null]} null [1, null]'


def test_null_in_optional_variable_takes_the_default() -> None:
    t = template("{{ text }} [{{ labels | default('x, y') }}]{% if note is defined %} {{ note }}{% endif %}")
    assert t.render({"text": "hi", "labels": None, "note": None}) == "hi [x, y]"
    assert t.render({"text": "hi", "labels": "a", "note": "n"}) == "hi [a] n"
    # A template that tests for null itself never prints it: no error.
    assert template("{% if a is none %}none{% else %}{{ a }}{% endif %}").render({"a": None}) == "none"


def test_syntax_error_is_usage_error() -> None:
    with pytest.raises(UsageError, match="line 1"):
        template("{{ a ")


@pytest.mark.parametrize(("text", "tag"), [
    ('{% include "header.j2" %}{{ a }}', "include"),
    ('{% extends "base.j2" %}', "extends"),
    ('{% import "macros.j2" as m %}{{ a }}', "import"),
    ('\n{% from "macros.j2" import box %}{{ a }}', "import"),
])
def test_include_extends_and_import_are_refused_before_any_row(text: str, tag: str) -> None:
    # There is no loader: these failed every row ("no loader for this environment specified", exit 3)
    # after the model loaded.
    with pytest.raises(UsageError, match=f"uses {{% {tag} %}} on line \\d.*one file"):
        template(text)


def test_file_wins_over_recipe_and_unknown_names_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("classify").write_text("mine: {{ text }}", encoding="utf-8")
    assert resolve_template("classify").text == "mine: {{ text }}"
    os.remove("classify")
    src = resolve_template("classify")
    assert src.recipe is not None and src.name == "recipe:classify"
    assert resolve_template("summarize.j2").recipe is not None
    with pytest.raises(UsageError, match="neither a file nor a recipe.*classify, extract, summarize"):
        resolve_template("nope")


def test_recipes_are_documented_and_share_a_static_prefix() -> None:
    listed = recipes.list_recipes()
    assert {"classify", "extract", "summarize"} <= {r.name for r in listed}
    for recipe in listed:
        assert recipe.description and recipe.max_tokens > 0
        assert "text" in recipe.required_columns
        t = PromptTemplate(resolve_template(recipe.name))
        assert t.required_variables == set(recipe.required_columns)
        assert t.optional_variables == set(recipe.optional_columns)
        first = t.render({"text": "AAA"})
        second = t.render({"text": "BBB"})
        # The row field comes last: the two prompts differ only at the very end.
        common = os.path.commonprefix([first, second])
        assert len(common) == first.index("AAA") > 100
        assert len(first) - len(common) - len("AAA") < 20  # only a short cue like "Label:" follows


class FakeTokenizer:
    """Bytes as token ids; a chat template that wraps the message in markers."""

    has_chat_template = True

    def apply_chat_template(self, user_message: str, system: str | None = None) -> str:
        return (f"<s>{system}</s>" if system is not None else "") + f"<u>{user_message}</u><a>"

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        prefix = [0] if add_special_tokens else []
        return [prefix + list(t.encode("utf-8")) for t in texts]


def test_prompt_encoder_batches_rows_and_failures_in_order() -> None:
    batch = pa.record_batch(
        {ROW_ID: pa.array([10, 11, 12], pa.int64()), "text": ["hi", "x", "yo"], "n": [1, 0, 2], "wide": [1, 2, 3]}
    )
    t = template("{{ text }}{{ 1 // n }}")  # n == 0 fails with a ZeroDivisionError in that row only
    plain = PromptEncoder(t, FakeTokenizer(), chat=False).encode(batch)
    assert plain == [
        PromptRow(10, [0] + list(b"hi1")),
        FailedRow(11, plain[1].error),
        PromptRow(12, [0] + list(b"yo0")),
    ]
    assert "template error" in plain[1].error and "division" in plain[1].error
    chat = PromptEncoder(t, FakeTokenizer(), chat=True).encode(batch)
    assert chat[0] == PromptRow(10, list(b"<u>hi1</u><a>"))  # chat text is encoded without specials


@pytest.mark.parametrize("text, expected", [
    ("{{ row }}", '{"text": "hi", "n": 1}'),
    ("{{ row | length }}", "2"),
    ("{% for k in row %}{{ k }};{% endfor %}", "text;n;"),
    ('{{ row.get("text") }}', "hi"),
    ('{% for k in ["text"] %}{{ row[k] }}{% endfor %}', "hi"),
])
def test_row_read_whole_or_by_computed_keys_renders(text: str, expected: str) -> None:
    t = template(text)
    t.check_columns(["text", "n"])  # was a TypeError: no literal row["..."] keys to check
    batch = pa.record_batch({ROW_ID: pa.array([0], pa.int64()), "text": ["hi"], "n": [1]})
    [row] = PromptEncoder(t, FakeTokenizer(), chat=False).encode(batch)
    assert row == PromptRow(0, [0] + list(expected.encode()))


def test_nanosecond_times_render_with_every_digit() -> None:
    # Python's datetime holds microseconds: to_pylist refused these values (a traceback for the run).
    batch = pa.record_batch({ROW_ID: pa.array([0], pa.int64()),
                             "ts": pa.array([1_700_000_000_123_456_789], pa.timestamp("ns")),
                             "t": pa.array([5], pa.time64("ns"))})
    [row] = PromptEncoder(template("{{ ts }} {{ t }}"), FakeTokenizer(), chat=False).encode(batch)
    assert row == PromptRow(0, [0] + list(b"2023-11-14 22:13:20.123456789 00:00:00.000000005"))


def test_float32_cells_print_as_written_not_as_float64() -> None:
    # A Parquet float32 price of 1.1 printed into prompts as 1.100000023841858.
    batch = pa.record_batch({ROW_ID: pa.array([0, 1], pa.int64()), "p": pa.array([1.1, None], pa.float32()),
                             "q": pa.array([0.1, 3.4028235e38], pa.float32())})
    rows = PromptEncoder(template("{{ p }} {{ q }}"), FakeTokenizer(), chat=False).encode(batch.slice(0, 1))
    assert rows == [PromptRow(0, [0] + list(b"1.1 0.1"))]
    assert PromptEncoder(template("{{ p * 2 }}"), FakeTokenizer(), chat=False).encode(batch.slice(0, 1)) == [
        PromptRow(0, [0] + list(b"2.2"))]  # still a number


def test_json_nested_in_lists_and_structs_prints_once(tmp_path: Path) -> None:
    # JSON input whose list elements or struct fields mix types: DuckDB reads them as JSON texts, which
    # printed as JSON again were double-encoded (["1", "\"a\"", null]).
    from batchllm_cli.table_io import TableSource

    path = tmp_path / "in.jsonl"
    path.write_text('{"arr": [1, "a", null], "o": {"k": [2, "x"]}, "j": 5}\n{"arr": [2], "o": {"k": []}, "j": "s"}\n')
    t = template("{{ arr }} {{ o }} {{ j }} {{ arr[0] + 1 }}")  # elements are values: 1 + 1 = 2
    with TableSource(path) as src:
        encoder = PromptEncoder(t, FakeTokenizer(), chat=False, decoders=src.json_decoders())
        rows = [r for batch in src.batches() for r in encoder.encode(batch)]
    # (a top-level field of mixed types stays its JSON text, as documented: 5 and "s")
    assert rows == [PromptRow(0, [0] + list(b'[1, "a", null] {"k": [2, "x"]} 5 2')),
                    PromptRow(1, [0] + list(b'[2] {"k": []} "s" 3'))]
