"""Structured output end to end on the demo model: --choices, --regex, --json-schema (and the recipes'
defaults) give answers that are valid, typed columns of the right Parquet/CSV/JSONL types, error rows for
values cut by --max-tokens, and one-line refusals (exit 2 / 4) before the model loads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli_process

from batchllm_cli.structured_output import choices_constraint, schema_constraint, typed_columns, typed_fields
from reliability_utils import flat, invoke, read_jsonl, read_rows, write_rows_csv, write_template

# Enough tokens for whole values on the byte-level demo model; no chat template, a roomy step.
ARGS = ["--kv-cache-memory", "16MiB", "--no-chat", "--max-batch-tokens", "2048"]
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["pos", "neg", "mixed"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "ok": {"type": "boolean"},
        "who": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                                 "tag": {"enum": ["a", "b"]}}, "required": ["n", "tag"]},
        "codes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        "weight": {"type": "number", "minimum": 0, "maximum": 1},
        "note": {"type": "string", "maxLength": 3},
    },
    "required": ["label", "score", "who", "codes"],
}
TYPES = {
    "label": pa.string(), "score": pa.int64(), "ok": pa.bool_(),
    "who": pa.struct([pa.field("n", pa.int64()), pa.field("tag", pa.string())]),
    "codes": pa.list_(pa.int64()), "weight": pa.float64(), "note": pa.string(),
}


@pytest.fixture
def job(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    return write_rows_csv(tmp_path / "in.csv", 12), write_template(tmp_path / "t.j2")


def _run(inp: Path, tpl: Path, out: Path, *extra: str):  # noqa: ANN202 - click's Result
    return invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), *ARGS, *extra])


def _schema_file(tmp_path: Path, schema: dict) -> Path:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    return path


def _valid(obj: dict) -> bool:
    """SCHEMA, checked by hand (required keys, enums, bounds, nesting, no other keys)."""
    if set(obj) - set(SCHEMA["properties"]) or not set(SCHEMA["required"]) <= set(obj):
        return False
    who = obj["who"]
    return (
        obj["label"] in ("pos", "neg", "mixed")
        and type(obj["score"]) is int and 1 <= obj["score"] <= 5
        and type(obj.get("ok", True)) is bool
        and set(who) == {"n", "tag"} and type(who["n"]) is int and 0 <= who["n"] <= 9 and who["tag"] in ("a", "b")
        and len(obj["codes"]) <= 2 and all(type(c) is int and 0 <= c <= 9 for c in obj["codes"])
        and 0 <= obj.get("weight", 0) <= 1
        and len(obj.get("note", "")) <= 3
    )


def test_choices_every_answer_is_a_label(job, tmp_path: Path) -> None:
    inp, tpl = job
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("yes\nno\n\nnot sure\n", encoding="utf-8")
    for arg, labels in (("yes,no,not sure", {"yes", "no", "not sure"}), (f"@{labels_file}", {"yes", "no", "not sure"})):
        out = tmp_path / f"out{len(arg)}.parquet"
        result = _run(inp, tpl, out, "--choices", arg, "--max-tokens", "12")
        assert result.exit_code == 0, result.output
        rows = read_rows(out)
        assert {r["response"] for r in rows} <= labels and all(r["response_finish_reason"] == "stop" for r in rows)


def test_regex_every_answer_matches(job, tmp_path: Path) -> None:
    inp, tpl = job
    out = tmp_path / "out.parquet"
    result = _run(inp, tpl, out, "--regex", r"[A-Z]{2}-[0-9]{1,3}", "--max-tokens", "10")
    assert result.exit_code == 0, result.output
    for row in read_rows(out):
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{1,3}", row["response"]), row


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_schema_answers_are_valid_and_typed(job, tmp_path: Path, suffix: str) -> None:
    inp, tpl = job
    out = tmp_path / f"out{suffix}"
    result = _run(inp, tpl, out, "--json-schema", str(_schema_file(tmp_path, SCHEMA)), "--max-tokens", "120",
                  "--column", "ans")
    assert result.exit_code in (0, 3), result.output
    rows = read_rows(out)
    ok = [r for r in rows if r["ans_error"] is None]
    assert len(ok) >= len(rows) // 2, rows  # a random model may run out of tokens in a number, rarely more
    for row in ok:
        obj = json.loads(row["ans"])
        assert _valid(obj), obj
        assert list(obj) == [k for k in SCHEMA["properties"] if k in obj]  # the schema's property order
        for name in TYPES:
            typed = row[f"ans_{name}"]
            if suffix == ".csv" and typed is not None and TYPES[name] != pa.string():
                typed = json.loads(typed)  # CSV is text (read back as written): numbers, booleans, JSON
            assert typed == obj.get(name), (name, row)
    if suffix == ".parquet":
        schema = pq.read_schema(out)
        for name, t in TYPES.items():
            assert schema.field(f"ans_{name}").type == t, name
    if suffix == ".csv":
        header = out.read_text(encoding="utf-8").splitlines()[0].split(",")
        assert header[-len(TYPES):] == [f"ans_{name}" for name in TYPES]


def test_value_cut_by_max_tokens_is_an_error_row(job, tmp_path: Path) -> None:
    inp, tpl = job
    out = tmp_path / "out.parquet"
    # every label is longer than 3 byte tokens on the demo model
    result = _run(inp, tpl, out, "--choices", "positive,negative", "--max-tokens", "3")
    assert result.exit_code == 3, result.output
    rows = read_rows(out)
    assert all(r["response_finish_reason"] == "length" and "--max-tokens" in r["response_error"] for r in rows)
    errors = read_jsonl(tmp_path / "out.parquet.errors.jsonl")
    assert len(errors) == len(rows) and {e["error_type"] for e in errors} == {"incomplete_structured_output"}


def test_a_whole_value_that_takes_exactly_max_tokens_is_an_answer(job, tmp_path: Path) -> None:
    """`--choices ab,cd --max-tokens 2`: the grammar had ended (only end-of-sequence could follow) when the
    token limit came, so the answer is whole; it was an incomplete_structured_output row (exit 3). A value
    the grammar could still extend (`012` of `[0-9]{3}|[0-9]{6}`) stays cut."""
    inp, tpl = job
    for n, (flag, value, tokens) in enumerate((("--choices", "ab,cd", "2"), ("--regex", "[0-9]{3}", "3"))):
        out = tmp_path / f"whole{n}.parquet"
        result = _run(inp, tpl, out, flag, value, "--max-tokens", tokens)
        assert result.exit_code == 0, result.output
        rows = read_rows(out)
        assert all(r["response_finish_reason"] == "stop" and r["response_error"] is None for r in rows), rows[:2]
        assert all(r["response_completion_tokens"] == int(tokens) for r in rows), rows[:2]
        assert all(re.fullmatch("ab|cd" if flag == "--choices" else "[0-9]{3}", r["response"]) for r in rows), rows[:2]
    out = tmp_path / "extendable.parquet"
    result = _run(inp, tpl, out, "--regex", "[0-9]{3}|[0-9]{6}", "--max-tokens", "3")
    assert result.exit_code == 3, result.output
    assert all(r["response_finish_reason"] == "length" and "--max-tokens" in r["response_error"]
               for r in read_rows(out))


def test_schema_cut_leaves_typed_columns_null(job, tmp_path: Path) -> None:
    inp, tpl = job
    out = tmp_path / "out.parquet"
    result = _run(inp, tpl, out, "--json-schema", str(_schema_file(tmp_path, SCHEMA)), "--max-tokens", "4")
    assert result.exit_code == 3, result.output
    for row in read_rows(out):
        assert row["response_finish_reason"] == "length" and row["response_error"]
        assert all(row[f"response_{name}"] is None for name in TYPES)


def test_recipes_carry_default_constraints(tmp_path: Path, env: dict[str, str]) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("text\ngreat kettle\nbroken lid\n", encoding="utf-8")
    out = tmp_path / "c.parquet"
    result = invoke(["run", str(inp), "-t", "classify", "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert {r["response"] for r in read_rows(out)} <= {"positive", "negative", "neutral"}
    out = tmp_path / "o.parquet"  # --choices overrides the recipe's labels
    result = invoke(["run", str(inp), "-t", "classify", "-o", str(out), *ARGS, "--choices", "good,bad"])
    assert result.exit_code == 0, result.output
    assert {r["response"] for r in read_rows(out)} <= {"good", "bad"}
    out = tmp_path / "e.parquet"  # extract: its fields as list columns (a random model may run out of tokens)
    result = invoke(["run", str(inp), "-t", "extract", "-o", str(out), *ARGS, "--max-tokens", "8"])
    assert result.exit_code in (0, 3), result.output
    schema = pq.read_schema(out)
    for name in ("people", "organizations", "places", "dates"):
        assert schema.field(f"response_{name}").type == pa.list_(pa.string())


def test_chat_template_constrains_only_the_answer(job, tmp_path: Path) -> None:
    inp, tpl = job
    out = tmp_path / "out.parquet"
    args = [a for a in ARGS if a != "--no-chat"]
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(out), *args, "--chat", "--choices", "yes,no",
                     "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert {r["response"] for r in rows} <= {"yes", "no"}
    # the prompt is the chat-wrapped one (role markers count), the answer alone is constrained
    assert all(r["response_prompt_tokens"] > len("Say: r0 a") for r in rows)


@pytest.mark.parametrize(
    ("extra", "schema_text", "expect"),
    [
        (["--regex", "[a-"], None, "--regex cannot be compiled"),
        (["--choices", "a", "--regex", "b"], None, "--choices and --regex cannot be used together"),
        (["--choices", " , "], None, "names no label"),
        ([], '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "The JSON schema cannot be compiled"),
        ([], "[1, 2", "is not valid JSON"),
        ([], '{"properties": {"error": {"type": "string"}}}', "clashes with the output column"),
        ([], '{"properties": {"Error": {"type": "string"}}}', "'response_Error', which clashes with the output column"),
        (["--column", "r"], '{"properties": {"TEXT": {"type": "string"}}}', "clashes with the input column"),
        ([], '{"properties": {"x\\u0000y": {"type": "integer"}}}', "holds a NUL character, which a column name cannot keep"),
        ([], '{"properties": {"n": {"type": "integer", "maximum": 1' + "0" * 5000 + '}}}', "is not valid JSON"),
    ],
)
def test_bad_constraint_fails_before_the_model_loads(
    tmp_path: Path, env: dict[str, str], extra: list[str], schema_text: str | None, expect: str
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("id,text,r_text\n1,a,b\n", encoding="utf-8")
    tpl = write_template(tmp_path / "t.j2")
    if schema_text is not None:
        schema = tmp_path / "schema.json"
        schema.write_text(schema_text, encoding="utf-8")
        extra = [*extra, "--json-schema", str(schema)]
    out = tmp_path / "out.parquet"
    result = _run(inp, tpl, out, *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expect in errors[0], result.stderr
    assert not out.exists()
    if "--column" not in extra:  # analyze refuses what run (with its default --column) refuses
        analyzed = invoke(["analyze", str(inp), "-t", str(tpl), "--no-chat", *extra])
        assert analyzed.exit_code == 2, analyzed.output
        assert [line for line in analyzed.stderr.splitlines() if line.startswith("error: ")] == errors[:1]


def test_changed_constraint_on_resume_is_refused(job, tmp_path: Path, env: dict[str, str]) -> None:
    inp, tpl = job
    out = tmp_path / "out.parquet"
    schema = _schema_file(tmp_path, SCHEMA)
    # A run killed after its first shard commit: a checkpoint holding finished rows of this job.
    args = ["run", str(inp), "-t", str(tpl), "-o", str(out), *ARGS, "--json-schema", str(schema),
            "--checkpoint-rows", "2"]
    code, log = cli_process.run(args, {**env, "BATCHLLM_CRASH_AT": "manifest_update:1"})
    assert code == 137, log
    changed = dict(SCHEMA, required=["label"])
    schema.write_text(json.dumps(changed), encoding="utf-8")
    result = _run(inp, tpl, out, "--json-schema", str(schema))
    assert result.exit_code == 4, result.output
    assert "belongs to a different job" in flat(result.stderr) and "structured output" in flat(result.stderr)
    result = _run(inp, tpl, out, "--choices", "a,b")
    assert result.exit_code == 4, result.output


def test_analyze_accepts_the_same_flags(job, tmp_path: Path) -> None:
    inp, tpl = job
    base = ["analyze", str(inp), "-t", str(tpl), "--no-chat", "--json", "-"]
    plain = invoke(base)
    constrained = invoke([*base, "--json-schema", str(_schema_file(tmp_path, SCHEMA))])
    assert plain.exit_code == constrained.exit_code == 0, constrained.output
    key = "prompt_tokens"
    assert json.loads(plain.stdout)[key] == json.loads(constrained.stdout)[key]  # prompts unchanged
    bad = invoke([*base, "--regex", "(unclosed"])
    assert bad.exit_code == 2 and "--regex cannot be compiled" in flat(bad.stderr)


def test_properties_without_one_type_are_kept_as_json_text() -> None:
    schema = {"type": "object", "properties": {
        "maybe": {"type": ["integer", "null"]},
        "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object"},
        "mixed_enum": {"enum": ["a", 1]},
        "tags": {"type": "array", "items": {"type": "string"}},
    }}
    fields = typed_fields(schema_constraint(schema))
    assert [(f.name, f.type, f.json_text) for f in fields] == [
        ("maybe", pa.int64(), False), ("either", pa.string(), True), ("free", pa.string(), True),
        ("mixed_enum", pa.string(), True), ("tags", pa.list_(pa.string()), False),
    ]
    answers = ['{"maybe": null, "either": 3, "free": {"k": [1]}, "mixed_enum": "a", "tags": ["x"]}', None]
    columns = typed_columns(answers, fields, nested_as_json=False)
    assert [c.to_pylist() for c in columns] == [[None, None], ["3", None], ['{"k": [1]}', None], ['"a"', None],
                                                [["x"], None]]
    assert typed_columns(answers, fields, nested_as_json=True)[4].to_pylist() == ['["x"]', None]


def test_pydantic_refs_and_optionals_get_typed_columns(job, tmp_path: Path) -> None:
    """pydantic writes an enum or nested model as a `$ref` into `$defs` and Optional[T] as anyOf [T, null]:
    they were JSON-text columns ('"good"' with its quotes, '94' as text) instead of VARCHAR and BIGINT."""
    inp, tpl = job
    schema = {"type": "object", "$defs": {"lab": {"type": "string", "enum": ["good", "bad"]},
                                          "who": {"type": "object", "properties": {"n": {"$ref": "#/$defs/digit"}},
                                                  "required": ["n"], "additionalProperties": False},
                                          "digit": {"type": "integer", "minimum": 0, "maximum": 9}},
              "properties": {"label": {"$ref": "#/$defs/lab"},
                             "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]},
                             "who": {"anyOf": [{"$ref": "#/$defs/who"}, {"type": "null"}]}},
              "required": ["label", "age", "who"], "additionalProperties": False}
    out = tmp_path / "out.parquet"
    result = _run(inp, tpl, out, "--json-schema", str(_schema_file(tmp_path, schema)), "--max-tokens", "40")
    assert result.exit_code in (0, 3), result.output
    types = pq.read_schema(out)
    assert types.field("response_label").type == pa.string() and types.field("response_age").type == pa.int64()
    assert types.field("response_who").type == pa.struct([pa.field("n", pa.int64())])
    ok = [r for r in read_rows(out) if r["response_error"] is None]
    assert ok, result.output
    for row in ok:
        obj = json.loads(row["response"])
        assert (row["response_label"], row["response_age"], row["response_who"]) == (obj["label"], obj["age"], obj["who"])
    recursive = {"type": "object", "$defs": {"node": {"type": "object", "properties": {"kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "properties": {"tree": {"$ref": "#/$defs/node"}}}
    assert [(f.type, f.json_text) for f in typed_fields(schema_constraint(recursive))] == [(pa.string(), True)]


@pytest.mark.parametrize("flag", ["--json-schema", "--choices"])
def test_a_written_file_that_is_the_constraint_file_is_refused(job, tmp_path: Path, flag: str) -> None:
    inp, tpl = job
    source = _schema_file(tmp_path, SCHEMA) if flag == "--json-schema" else tmp_path / "labels.txt"
    if flag == "--choices":
        source.write_text("a\nb\n", encoding="utf-8")
    before = source.read_bytes()
    value = str(source) if flag == "--json-schema" else f"@{source}"
    result = _run(inp, tpl, tmp_path / "out.parquet", flag, value, "--summary", str(source))
    assert result.exit_code == 2, result.output
    assert flag in flat(result.stderr) and "--summary" in flat(result.stderr)
    assert source.read_bytes() == before


def test_an_integer_beyond_64_bits_is_a_row_error_not_a_crash_at_the_output() -> None:
    """A model answered {"n": 41316260093675236095415583} for an integer property: writing its BIGINT
    column raised OverflowError after every row was committed, and every re-run did the same."""
    from batchllm_cli.collector import ResultCollector
    from batchllm_cli.structured_output import INCOMPLETE, answer_error, with_typed_columns
    from engine.results import GenerationResult

    constraint = schema_constraint({"type": "object", "properties": {"n": {"type": "integer"},
                                                                    "xs": {"type": "array", "items": {"type": "integer"}}}})
    assert answer_error(constraint, '{"n": 41316260093675236095415583, "xs": []}', "stop") is not None
    assert answer_error(constraint, '{"n": 1, "xs": [2, -9223372036854775809]}', "stop") is not None
    assert answer_error(constraint, '{"n": 9223372036854775807, "xs": [-9223372036854775808]}', "stop") is None
    collector = ResultCollector(constraint=constraint)
    for key, text in enumerate(['{"n": 41316260093675236095415583, "xs": [1]}', '{"n": 7, "xs": [1]}']):
        collector.add_result(GenerationResult(key, text, (1, 2), "stop", 3))
    table = collector.drain()
    assert table.column("error_type").to_pylist() == [INCOMPLETE, None]
    fields = typed_fields(constraint)
    typed, _ = with_typed_columns(table, fields, ["r_n", "r_xs"], nested_as_json=False)  # no OverflowError
    assert typed.column("structured_0").to_pylist() == [None, 7]


def test_a_regex_answer_cut_by_a_stop_string_is_a_row_error(job, tmp_path: Path) -> None:
    """`--stop -` cuts every `XX-9` answer to `XX`: it was written with exit 0 and no error."""
    inp, tpl = job
    out = tmp_path / "out.parquet"
    result = _run(inp, tpl, out, "--regex", r"[A-Z]{2}-[0-9]", "--max-tokens", "8", "--stop", "-")
    assert result.exit_code == 3, result.output
    rows = read_rows(out)
    assert rows and all(r["response_error"] and "--stop string '-'" in r["response_error"] for r in rows), rows[:2]


def test_a_stop_string_that_leaves_a_shorter_valid_value_is_a_row_error(job, tmp_path: Path) -> None:
    """`--choices no,nope --stop pe` stored `no` where the model said `nope`, and `--regex
    '[0-9]{3}|[0-9]{6}' --stop 3` stored 012 of 012318, with exit 0: the text left before the stop string
    was itself a whole value. Every stop string found inside a constrained answer cuts it."""
    inp, tpl = job
    for n, (flag, value, stop, whole) in enumerate((("--choices", "no,nope", "pe", "no|nope"),
                                                     ("--regex", "[0-9]{3}|[0-9]{6}", "3", "[0-9]{3}|[0-9]{6}"))):
        out = tmp_path / f"cut{n}.jsonl"
        result = _run(inp, tpl, out, flag, value, "--stop", stop, "--max-tokens", "8")
        assert result.exit_code == 3, result.output
        rows = read_rows(out)
        cut = [r for r in rows if r["response_error"] is not None]
        assert cut, rows  # the demo model writes the stop string in some rows
        for row in cut:
            assert f"--stop string {stop!r}" in row["response_error"], row
        for row in rows:  # a row left as an answer is the model's whole value: it ended at end-of-sequence
            if row["response_error"] is None:
                assert re.fullmatch(whole, row["response"]) and stop not in row["response"], row
                assert row["response_completion_tokens"] == len(row["response"]) + 1, row  # byte tokens + EOS


def test_answers_are_checked_as_whole_values_when_they_may_be_cut_or_hold_invalid_bytes() -> None:
    from batchllm_cli.structured_output import Constraint, answer_error

    regex = Constraint("regex", "[A-Z]{2}-[0-9]")
    assert answer_error(regex, "SH", "stop") is None  # no stop string: decoding guarantees a whole value
    assert answer_error(regex, "SH", "stop", stop_string="-") is not None
    assert answer_error(choices_constraint(["no", "nope"]), "no", "stop", stop_string="pe") is not None
    four = Constraint("regex", ".{4}")  # decoded bytes that were not UTF-8: 6 characters, not 4
    assert answer_error(four, "G\ufffd\ufffd\ufffd g", "stop") is not None and answer_error(four, "abcd", "stop") is None
