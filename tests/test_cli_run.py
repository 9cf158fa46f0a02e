"""`batchllm run` end to end on the built-in demo model (random weights, CPU, a few tokens per row)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm_cli.table_io import read_table

REPO = Path(__file__).resolve().parent.parent
NEW_COLUMNS = [
    "response",
    "response_finish_reason",
    "response_prompt_tokens",
    "response_completion_tokens",
    "response_error",
]
ROWS = [
    {"id": 1, "text": "plain"},
    {"id": 2, "text": "has, a comma"},
    {"id": 3, "text": "two\nlines, and a comma"},
    {"id": 4, "text": 'a "quoted" word'},
    {"id": 5, "text": "unicode: é 完璧 😀"},
]
# Small KV cache and a couple of tokens per row keep each run around a second on a shared CPU.
FAST = ["--max-tokens", "2", "--kv-cache-memory", "16MiB"]

runner = CliRunner()


@pytest.fixture(autouse=True)
def demo_cache(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the default (--model omitted) at the session's demo model, never the user's cache."""
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(demo_model_dir.parent))


def write_table(path: Path, rows: list[dict]) -> Path:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.j2"
    path.write_text(text, encoding="utf-8")
    return path


def run(args: list[str]):  # noqa: ANN201 - click's Result
    return runner.invoke(app_(), ["run", *args])


def app_():  # noqa: ANN202 - imported late so collection does not pay for the CLI import
    from batchllm_cli.app import app

    return app


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_round_trip_keeps_rows_and_order(tmp_path: Path, suffix: str) -> None:
    inp = write_table(tmp_path / f"in{suffix}", ROWS)
    out = tmp_path / "out" / "result.parquet"
    tpl = write_template(tmp_path, "Repeat: {{ text }}")
    result = run([str(inp), "--template", str(tpl), "--output", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stderr  # the demo model says what it is
    table = read_table(out)
    assert table.column_names == ["id", "text", *NEW_COLUMNS]
    # CSV values come back as the file's text; JSON and Parquet keep their types.
    as_read = str if suffix == ".csv" else int
    assert table.select(["id", "text"]).to_pylist() == [{**r, "id": as_read(r["id"])} for r in ROWS]
    assert set(table.column("response_finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(n > 0 for n in table.column("response_prompt_tokens").to_pylist())
    assert all(1 <= n <= 2 for n in table.column("response_completion_tokens").to_pylist())
    assert table.column("response_error").null_count == len(ROWS)


def test_column_name_csv_output_and_summary_on_stdout(tmp_path: Path) -> None:
    inp = write_table(tmp_path / "in.csv", ROWS)
    out = tmp_path / "out.csv"
    tpl = write_template(tmp_path, "{{ text }}")
    result = run([str(inp), "-t", str(tpl), "-o", str(out), "--column", "answer", "--summary", "-", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("rows", "rows_ok", "rows_failed", "prompt_tokens", "prefill_tokens", "completion_tokens",
                "elapsed_s", "rows_per_s", "output_tokens_per_s", "preemptions"):
        assert key in summary["attempt"]
    assert "model" in summary
    job = summary["job"]
    assert (job["rows"], job["rows_ok"], job["rows_failed"]) == (5, 5, 0)
    assert summary["attempt"]["prefill_tokens"] >= 1 and job["completion_tokens"] >= 5
    table = read_table(out)
    assert table.column_names == ["id", "text", "answer", "answer_finish_reason", "answer_prompt_tokens",
                                  "answer_completion_tokens", "answer_error"]
    assert table.column("text").to_pylist() == [r["text"] for r in ROWS]
    # CSV has no types: batchllm reads every CSV column (its own output's too) as the text written.
    assert job["prompt_tokens"] == sum(int(n) for n in table.column("answer_prompt_tokens").to_pylist())


def test_row_errors_exit_3_and_fill_the_error_column(tmp_path: Path) -> None:
    rows = [{"text": "ok", "n": 1}, {"text": "bad", "n": 0}, {"text": "x" * 5000, "n": 1}, {"text": "ok", "n": 2}]
    inp = write_table(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary_path = tmp_path / "summary.json"
    # n == 0 fails rendering; the 5000-character row is longer than the demo model's context.
    tpl = write_template(tmp_path, "{{ text }} {{ 10 // n }}")
    result = run([str(inp), "-t", str(tpl), "-o", str(out), "--summary", str(summary_path), *FAST])
    assert result.exit_code == 3, result.output
    table = read_table(out)
    assert table.column("text").to_pylist() == [r["text"] for r in rows]
    assert table.column("response_finish_reason").to_pylist()[1:3] == ["error", "error"]
    errors = table.column("response_error").to_pylist()
    assert errors[0] is None and errors[3] is None
    assert "template error" in errors[1]
    assert "context" in errors[2]
    assert table.column("response").to_pylist()[1:3] == [None, None]
    job = json.loads(summary_path.read_text())["job"]
    assert (job["rows"], job["rows_ok"], job["rows_failed"]) == (4, 2, 2)
    assert "row 1: template error" in " ".join(result.stderr.split())


def test_limit_and_chat_toggle(tmp_path: Path) -> None:
    inp = write_table(tmp_path / "in.csv", ROWS)
    tpl = write_template(tmp_path, "{{ text }}")
    counts = {}
    for flag in ("--chat", "--no-chat"):
        out = tmp_path / f"out{flag}.parquet"
        result = run([str(inp), "-t", str(tpl), "-o", str(out), "--limit", "2", flag, *FAST])
        assert result.exit_code == 0, result.output
        table = read_table(out)
        assert table.column("id").to_pylist() == ["1", "2"]  # CSV values are text
        counts[flag] = table.column("response_prompt_tokens").to_pylist()
    # The chat template wraps the prompt in role markers: more prompt tokens than the bare text.
    assert all(c > n for c, n in zip(counts["--chat"], counts["--no-chat"]))


def test_readme_demo_command(tmp_path: Path) -> None:
    out = tmp_path / "out" / "reviews.parquet"
    example = REPO / "examples" / "reviews.csv"
    result = run([str(example), "--template", "classify", "--output", str(out), "--limit", "3",
                  "--kv-cache-memory", "16MiB", "--summary", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["engine"]["max_tokens"] == 16  # the recipe's default
    table = read_table(out)
    assert table.column("review_id").to_pylist() == ["1", "2", "3"]  # CSV values are the file's text
    assert table.column("response_error").null_count == 3
