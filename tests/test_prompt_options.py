"""Prompt flags shared by run, analyze and render (--var, -p/--param, row[...], --system,
--truncate-column), JSON for nested values, `batchllm render` and `batchllm recipes NAME`: CLI-level,
with real files and the demo model's tokenizer."""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from engine.tokenizer import Tokenizer
from reliability_utils import flat, invoke, job_args, one_error_line, read_rows, write_rows_csv, write_template

CONTEXT = 2048  # the demo model's
INSTRUCTIONS = "You are a precise text classifier."  # the start of the classify recipe


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def render_json(*args: str) -> list[dict]:
    result = invoke(["render", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_var_and_params_use_a_recipe_on_a_table_without_text(tmp_path: Path, env: dict, no_model: None) -> None:
    inp = write_csv(tmp_path / "in.csv", ["id", "body"], [["1", "great product"], ["2", "it broke"]])
    refused = invoke(["render", str(inp), "-t", "classify"])
    assert refused.exit_code == 2
    assert "--var NAME=COLUMN" in flat(refused.stderr)  # the message says how to fix it
    rows = render_json(str(inp), "-t", "classify", "--var", "text=body", "-p", "labels=spam, ham", "--no-chat")
    assert [r["row"] for r in rows] == [0, 1]
    assert "Allowed labels: spam, ham\n" in rows[0]["prompt"]
    assert "Text:\ngreat product\n" in rows[0]["prompt"] and "Text:\nit broke\n" in rows[1]["prompt"]
    # A typo in a flag is a usage error naming the template's variables, before any model.
    for flag in (["--var", "txt=body"], ["-p", "label=x"]):
        result = invoke(["render", str(inp), "-t", "classify", "--var", "text=body", *flag])
        assert result.exit_code == 2 and "labels, text" in one_error_line(result.stderr)
    result = invoke(["render", str(inp), "-t", "classify", "--var", "text=nope"])
    assert result.exit_code == 2 and "nope is not a column" in one_error_line(result.stderr)


def test_row_variable_reaches_columns_that_are_not_names(tmp_path: Path, env: dict, no_model: None) -> None:
    inp = write_csv(tmp_path / "in.csv", ["customer-name", "order id"], [["Ann", "A-1"], ["Bob", "B-2"]])
    tpl = write_template(tmp_path / "t.j2", 'Dear {{ row["customer-name"] }}, order {{ row["order id"] }}.')
    rows = render_json(str(inp), "-t", str(tpl), "--no-chat")
    assert [r["prompt"] for r in rows] == ["Dear Ann, order A-1.", "Dear Bob, order B-2."]
    missing = write_template(tmp_path / "m.j2", '{{ row["customer_name"] }}')
    result = invoke(["render", str(inp), "-t", str(missing)])
    assert result.exit_code == 2 and 'row["customer_name"]' in one_error_line(result.stderr)


def test_lists_structs_and_maps_render_as_json(tmp_path: Path, env: dict) -> None:
    table = pa.table({
        "tags": pa.array([["red", "é"], []], pa.list_(pa.string())),
        "meta": pa.array([{"n": 1, "xs": [0.5, None]}, {"n": 2, "xs": []}],
                         pa.struct([("n", pa.int64()), ("xs", pa.list_(pa.float64()))])),
        "m": pa.array([[("k", 1)], [("a", 2), ("b", 3)]], pa.map_(pa.string(), pa.int64())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    tpl = write_template(tmp_path / "t.j2",
                         "{{ tags }}|{{ meta }}|{{ m }}|{{ meta.n }}|{% for t in tags %}{{ t }};{% endfor %}")
    rows = render_json(str(tmp_path / "in.parquet"), "-t", str(tpl), "--no-chat")
    assert [r["prompt"] for r in rows] == [
        '["red", "é"]|{"n": 1, "xs": [0.5, null]}|{"k": 1}|1|red;é;',
        '[]|{"n": 2, "xs": []}|{"a": 2, "b": 3}|2|',
    ]


def test_a_time_renders_in_its_columns_zone_whatever_the_machines(
    tmp_path: Path, env: dict, no_model: None, machine_zone: Callable[[str], None]
) -> None:
    """It rendered in $TZ: 03:04:05+00:00 on one machine, 08:34:05+05:30 on another, for one job."""
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    pq.write_table(pa.table({"ts": pa.array([when], pa.timestamp("us", tz="America/New_York"))}), tmp_path / "in.parquet")
    tpl = write_template(tmp_path / "t.j2", "{{ ts }}|{{ row.ts }}")
    for zone in ("UTC", "Asia/Kolkata"):
        machine_zone(zone)
        rows = render_json(str(tmp_path / "in.parquet"), "-t", str(tpl), "--no-chat")
        assert [r["prompt"] for r in rows] == ["2024-01-01 22:04:05-05:00|2024-01-01 22:04:05-05:00"]


def test_render_prints_prompts_and_tokens_without_loading_weights(
    tmp_path: Path, demo_model_dir: Path, env: dict, no_model: None
) -> None:
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")  # any read of the weights fails
    inp = write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "first"], ["2", "second"], ["3", "third"]])
    tpl = write_template(tmp_path / "t.j2", "Say: {{ text }}")
    rows = render_json(str(inp), "-t", str(tpl), "--model", str(model), "--limit", "2")
    assert [r["row"] for r in rows] == [0, 1]
    assert rows[0]["prompt"] == "<|begin_of_text|><|user|>\nSay: first<|end_of_text|>\n<|assistant|>\n"
    tokenizer = Tokenizer(model)
    assert rows[0]["tokens"] == len(tokenizer.encode(rows[0]["prompt"], add_special_tokens=False)) == 17
    plain = invoke(["render", str(inp), "-t", str(tpl), "--model", str(model), "--no-chat"])
    assert plain.exit_code == 0, plain.output
    # Without the chat template the tokenizer adds its BOS: one token more than the text's bytes.
    assert plain.stdout.splitlines() == [
        "--- row 0: 11 tokens", "Say: first", "--- row 1: 12 tokens", "Say: second",
        "--- row 2: 11 tokens", "Say: third",
    ]
    # The weights really are unusable: run refuses them before anything runs.
    result = invoke(job_args(inp, tpl, tmp_path / "out.parquet", "--model", str(model)))
    assert result.exit_code == 2, result.output


def test_render_takes_skip_bad_rows_as_its_error_suggests(tmp_path: Path, env: dict) -> None:
    # The malformed-CSV error says "pass --skip-bad-rows", which render did not have.
    inp = tmp_path / "bad.csv"
    inp.write_text("text,b\nhello,1\nworld,2,3\nok,4\n")
    tpl = write_template(tmp_path / "t.j2", "{{ text }}")
    refused = invoke(["render", str(inp), "-t", str(tpl)])
    assert refused.exit_code == 2 and "--skip-bad-rows" in flat(refused.stderr)
    rows = render_json(str(inp), "-t", str(tpl), "--no-chat", "--skip-bad-rows")
    assert [r["prompt"] for r in rows] == ["hello", "ok"]
    said = invoke(["render", str(inp), "-t", str(tpl), "--no-chat", "--skip-bad-rows"])
    assert "1 malformed record(s) are left out (the first on line 3" in flat(said.stderr)


def test_system_message_goes_into_the_chat_template(
    tmp_path: Path, demo_model_dir: Path, env: dict, no_model: None
) -> None:
    inp = write_csv(tmp_path / "in.csv", ["text"], [["hello"]])
    tpl = write_template(tmp_path / "t.j2", "Say: {{ text }}")
    (tmp_path / "system.txt").write_text("Answer in French.", encoding="utf-8")
    for system in ("Answer in French.", f"@{tmp_path / 'system.txt'}"):
        [row] = render_json(str(inp), "-t", str(tpl), "--system", system)
        assert row["prompt"] == (
            "<|begin_of_text|><|system|>\nAnswer in French.<|end_of_text|>\n"
            "<|user|>\nSay: hello<|end_of_text|>\n<|assistant|>\n"
        )
    result = invoke(["render", str(inp), "-t", str(tpl), "--system", "x", "--no-chat"])
    assert result.exit_code == 2 and "--no-chat" in one_error_line(result.stderr)
    no_chat_model = tmp_path / "model"
    shutil.copytree(demo_model_dir, no_chat_model)
    config = json.loads((no_chat_model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_chat_model / "tokenizer_config.json").write_text(json.dumps(config))
    result = invoke(["render", str(inp), "-t", str(tpl), "--system", "x", "--model", str(no_chat_model)])
    assert result.exit_code == 2 and "has no chat template" in one_error_line(result.stderr)
    # A chat template without a system role (Gemma's raises) is refused before any row, naming the fix.
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{{ messages[-1]['content'] }}")
    (no_chat_model / "tokenizer_config.json").write_text(json.dumps(config))
    result = invoke(["render", str(inp), "-t", str(tpl), "--system", "x", "--model", str(no_chat_model)])
    assert result.exit_code == 2
    assert "System role not supported; drop --system" in one_error_line(result.stderr)
    assert render_json(str(inp), "-t", str(tpl), "--model", str(no_chat_model))[0]["prompt"] == "Say: hello"
    result = invoke(["render", str(inp), "-t", str(tpl), "--system", f"@{tmp_path / 'missing.txt'}"])
    assert result.exit_code == 2 and "cannot read" in one_error_line(result.stderr)


def test_recipes_name_prints_the_recipe() -> None:
    result = invoke(["recipes", "classify"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("classify: ")
    assert "text: the text to classify (required)" in out and "labels:" in out
    assert "max tokens: 16" in out and "choices: positive, negative, neutral" in out
    assert INSTRUCTIONS in out and "{{ text }}" in out
    result = invoke(["recipes", "nope"])
    assert result.exit_code == 2 and "classify, extract, summarize" in one_error_line(result.stderr)


def test_truncate_column_keeps_the_instructions_and_fits(tmp_path: Path, env: dict) -> None:
    long_text = " ".join(f"w{i}" for i in range(1500))  # ~6000 byte tokens: far over the context
    inp = write_csv(tmp_path / "in.csv", ["id", "body", "note"], [["1", long_text, "n1"], ["2", "short", "n2"]])
    common = ["-t", "classify", "--var", "text=body", "-p", "labels=spam, ham", "--system", "Be brief.",
              "--max-tokens", "3"]
    rows = render_json(str(inp), *common, "--truncate-column", "body")
    limit = CONTEXT - 3
    assert rows[0]["tokens"] == limit and rows[0]["truncated"] is True
    prompt = rows[0]["prompt"]
    assert prompt.startswith("<|begin_of_text|><|system|>\nBe brief.<|end_of_text|>\n<|user|>\n" + INSTRUCTIONS)
    assert prompt.endswith("\n\nLabel:<|end_of_text|>\n<|assistant|>\n")
    body = prompt.split("Text:\n", 1)[1].split("\n\nLabel:", 1)[0]
    assert long_text.startswith(body) and len(body) > 1500  # cut from its end, as much kept as fits
    assert "truncated" not in rows[1] and "Text:\nshort\n" in rows[1]["prompt"]
    # Without the flag the row is an error row; --truncate left would have cut the instructions.
    assert render_json(str(inp), *common)[0]["error_type"] == "prompt_too_long"
    result = invoke(["render", str(inp), *common, "--truncate-column", "note"])
    assert result.exit_code == 2 and "does not use" in one_error_line(result.stderr)

    # run sends exactly what render showed: same token counts, the long row counted as truncated.
    out = tmp_path / "out.parquet"
    result = invoke(["run", str(inp), *common, "--truncate-column", "body", "-o", str(out),
                     "--kv-cache-memory", "16MiB", "--summary", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["attempt"]["rows_truncated"] == 1
    assert [r["response_prompt_tokens"] for r in read_rows(out)] == [r["tokens"] for r in rows]
    # analyze counts the same rows as truncated.
    result = invoke(["analyze", str(inp), *common, "--truncate-column", "body", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows_truncated"] == 1 and report["rows_failed"] == 0
    assert report["prompt_tokens"] == sum(r["tokens"] for r in rows)


def test_changed_param_changes_the_job_fingerprint(tmp_path: Path, env: dict) -> None:
    inp = write_rows_csv(tmp_path / "in.csv", 4)
    tpl = write_template(tmp_path / "t.j2", "Say it {{ tone }}: {{ text }}")
    out = tmp_path / "out.parquet"
    args = job_args(inp, tpl, out, "-p", "tone=calmly")
    assert invoke(args).exit_code == 0
    assert "already finished" in flat(invoke(args).stderr)  # same flags: the same job
    result = invoke([*args[:-1], "tone=loudly"])
    assert result.exit_code == 0, result.output
    message = flat(result.stderr)
    assert "different job (changed: --param" in message and "calmly" in message and "loudly" in message
    assert "already finished" not in message  # it ran again


def test_truncate_column_fits_tightly_with_merging_tokenizers(tmp_path: Path, demo_model_dir: Path) -> None:
    """Cutting a cell by its own tokens lands on a prompt that fits and wastes at most a few tokens, also
    with a BPE tokenizer whose merges cross the cut and with multi-byte characters."""
    import random

    import model_factory
    from batchllm_cli.prompts import PromptEncoder, PromptRow
    from batchllm_cli.table_io import ROW_ID
    from batchllm_cli.templates import PromptTemplate, TemplateSource

    trained = tmp_path / "tok"
    trained.mkdir()
    model_factory.write_tokenizer(trained, chat_template_file=True)
    rng = random.Random(5)
    words = ["the", "cat", "naïve", "完璧", "😀", "tokens", "a", "über", "line\n", "  "]
    cells = ["".join(rng.choice(words) + rng.choice([" ", "", ","]) for _ in range(rng.randint(50, 400)))
             for _ in range(12)]
    batch = pa.record_batch({ROW_ID: pa.array(range(len(cells)), pa.int64()), "doc": cells,
                             "q": [f"question {i}?" for i in range(len(cells))]})
    template = PromptTemplate(TemplateSource("t.j2", "Read the document.\n{{ doc }}\nAnswer: {{ q }}"))
    for model_dir in (demo_model_dir, trained):
        tokenizer = Tokenizer(model_dir)
        for limit in (64, 97, 250):
            encoder = PromptEncoder(template, tokenizer, chat=True, max_prompt_tokens=limit, truncate_columns=("doc",))
            for cell, item in zip(cells, encoder.encode(batch)):
                assert isinstance(item, PromptRow)
                assert limit - 4 <= len(item.token_ids) <= limit or not item.truncated
                assert item.token_ids == tokenizer.encode(item.text, add_special_tokens=False)
                kept = item.text.split("Read the document.\n", 1)[1].rsplit("\nAnswer: question", 1)[0]
                assert cell.startswith(kept)
                assert item.truncated == (kept != cell)


def test_row_and_tojson_write_valid_json_for_every_parquet_value(tmp_path: Path, env: dict, no_model: None) -> None:
    """`{{ row | tojson }}` failed every row on a decimal, date, timestamp or binary cell ("Object of type
    Decimal is not JSON serializable", exit 3); `{{ row }}` wrote a NaN cell as bare NaN (not JSON) and
    binary as Python's b'...'. Both now write the text `{{ cell }}` prints, NaN as null."""
    import decimal

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "price": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)),
        "day": pa.array([datetime.date(2024, 1, 2)]),
        "ts": pa.array([datetime.datetime(2024, 1, 2, 3, 4, 5)], pa.timestamp("ms", tz="America/New_York")),
        "blob": pa.array([b"ab\xff"], pa.binary()),
        "score": pa.array([float("nan")]),
        "xs": pa.array([[1.5, float("nan")]]),
    }), inp)
    tpl = write_template(tmp_path / "t.j2", "{{ row }}\n{{ row | tojson }}\n{{ day | tojson }}\n{{ blob }}")
    [row] = render_json(str(inp), "-t", str(tpl), "--no-chat")
    whole, as_tojson, day, blob = row["prompt"].split("\n")
    expected = {"price": "1.50", "day": "2024-01-02", "ts": "2024-01-01 22:04:05-05:00", "blob": "ab\\xff",
                "score": None, "xs": [1.5, None]}
    assert json.loads(whole) == expected and json.loads(as_tojson) == expected, row["prompt"]
    assert list(json.loads(whole)) == list(expected)  # `{{ row }}` keeps the columns' order
    assert (day, blob) == ('"2024-01-02"', "ab\\xff")


def test_a_byte_order_mark_is_not_part_of_a_label_prompt_or_system_turn(tmp_path: Path, env: dict) -> None:
    """Files saved by Windows editors start with a UTF-8 byte order mark: it became part of the first
    --choices label and went into the prompt from a template or --system @FILE."""
    from batchllm_cli.structured_output import ConstraintFlags, resolve_constraint

    bom = "\ufeff"
    labels = tmp_path / "labels.txt"
    labels.write_text(bom + "yes\nno\n", encoding="utf-8")
    schema = tmp_path / "schema.json"
    schema.write_text(bom + '{"type": "string"}', encoding="utf-8")
    assert resolve_constraint(ConstraintFlags(choices=f"@{labels}")).labels == ("yes", "no")
    assert resolve_constraint(ConstraintFlags(json_schema=schema)).schema == {"type": "string"}
    inp = write_csv(tmp_path / "in.csv", ["text"], [["hello"]])
    tpl = write_template(tmp_path / "t.j2", bom + "Say: {{ text }}")
    system = tmp_path / "system.txt"
    system.write_text(bom + "Be brief.", encoding="utf-8")
    [plain] = render_json(str(inp), "-t", str(tpl), "--no-chat")
    assert plain["prompt"] == "Say: hello"
    [chat] = render_json(str(inp), "-t", str(tpl), "--system", f"@{system}")
    assert bom not in chat["prompt"] and "Be brief." in chat["prompt"], chat["prompt"]
