"""`batchllm analyze` as a user sees it: the report on stdout (`> report.txt`), messages on stderr, the
demo-tokenizer note, tokenizer-only directories of any architecture, top-prefix text that tells the
prefixes apart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import model_factory

ROOT = Path(__file__).resolve().parents[1]
# A pipe-like, colourless console of the usual width (stdout is not a terminal under CliRunner).
ENV = {"COLUMNS": "80", "NO_COLOR": "1"}

# One long instruction for every row, then a report from one of four offices; the reports of an
# office share their opening, so the shared prefixes nest: instruction, then instruction + office.
INSTRUCTION = (
    "You are a careful risk analyst working for the finance department of a large company. Read the "
    "quarterly report below and list every risk it names, one per line, most serious first, with no "
    "commentary, no numbering and no repetition of the report's own words.\nReport: "
)
OFFICES = ("Berlin", "Lisbon", "Madrid", "Oslo")


def _report_rows() -> list[dict[str, str]]:
    return [
        {"doc": f"{office} office, quarter {q}: revenue fell because of {cause}."}
        for office in OFFICES
        for q, cause in enumerate(("late shipments", "a strike", "currency losses"), 1)
    ]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    model_factory.write_tokenizer(out, chat_template_file=False)
    return out


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Path]:
    table = tmp_path / "reports.parquet"
    pq.write_table(pa.Table.from_pylist(_report_rows()), table)
    template = tmp_path / "risks.j2"
    template.write_text(INSTRUCTION + "{{ doc }}", encoding="utf-8")
    return table, template


def invoke(args: list[str]):  # noqa: ANN201 - click's Result
    from batchllm_cli.app import app

    return CliRunner().invoke(app, ["analyze", *args], env=ENV)


def test_report_goes_to_stdout_and_only_messages_to_stderr(job: tuple[Path, Path], demo_model_dir: Path, tmp_path: Path) -> None:
    """`batchllm analyze ... > report.txt` in a real process, with no --model: the demo tokenizer counts."""
    table, template = job
    report = tmp_path / "report.txt"
    page = tmp_path / "report.html"
    env = dict(os.environ, BATCHLLM_CACHE_DIR=str(demo_model_dir.parent), NO_COLOR="1", PYTHONPATH=str(ROOT))
    with report.open("w", encoding="utf-8") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "batchllm_cli", "analyze", str(table), "-t", str(template), "--no-chat",
             "--html", str(page)],
            stdout=out, stderr=subprocess.PIPE, text=True, env=env, timeout=300, cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr
    text = report.read_text(encoding="utf-8")
    for phrase in ("prompt tokens", "unique prompt tokens", "batchllm plan (ours)", "shared prefixes"):
        assert phrase in text, phrase
    assert "demo model's tokenizer" in text and "--tokenizer DIR" in text  # the report says what counted
    err = proc.stderr.splitlines()
    assert err and all(line.startswith(("note: ", "analyze: ", "html: ")) for line in err), proc.stderr
    note = [line for line in err if line.startswith("note: ")]
    assert len(note) == 1 and "demo model's tokenizer" in note[0] and "--model DIR or --tokenizer DIR" in note[0]
    assert "prompt tokens" not in proc.stderr
    assert page.is_file()


def test_json_to_stdout_keeps_the_text_report_on_stderr(job: tuple[Path, Path], tok_dir: Path) -> None:
    table, template = job
    result = invoke([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 12
    assert "batchllm plan (ours)" in result.stderr
    assert "demo" not in result.stderr  # a tokenizer was given: no demo note


@pytest.mark.parametrize("config", [None, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": 1024}])
def test_tokenizer_dir_of_any_architecture(job: tuple[Path, Path], tok_dir: Path, tmp_path: Path, config: dict | None) -> None:
    table, template = job
    tokenizer = tmp_path / "gpt2-tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).write_bytes((tok_dir / name).read_bytes())
    if config is not None:
        (tokenizer / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = invoke([str(table), "-t", str(template), "--tokenizer", str(tokenizer), "--no-chat", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows_planned"] == 12 and data["prompt_tokens"] > 0
    assert data["context_tokens"] == (None if config is None else 1024)  # read from config.json when given
    if config is not None:
        # `run` and `analyze --model` need a model batchllm can load; this one is refused there.
        refused = invoke([str(table), "-t", str(template), "--model", str(tokenizer), "--no-chat"])
        assert refused.exit_code == 2 and "not supported" in refused.stderr


def _prefix_texts(report: str) -> list[str]:
    """The text column of the top-prefix lines of a plain-text report."""
    lines = report.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "rows"])
    start = lines[head].index("text")
    texts = []
    for line in lines[head + 1:]:
        if not line[:start].strip() or not line.split()[0].isdigit():
            break
        texts.append(line[start:])
    return texts


def test_top_prefix_text_shows_where_prefixes_differ(job: tuple[Path, Path], tok_dir: Path) -> None:
    table, template = job
    result = invoke([str(table), "-t", str(template), "--tokenizer", str(tok_dir), "--no-chat", "--top", "5"])
    assert result.exit_code == 0, result.output
    texts = _prefix_texts(result.stdout)
    assert len(texts) == 5, result.stdout
    assert len(set(texts)) == len(texts), texts
    # The instruction is listed once; the office prefixes below it each show their own office.
    offices = [next((o for o in OFFICES if o in t), None) for t in texts]
    assert sum(o is None for o in offices) == 1, texts
    assert sorted(o for o in offices if o is not None) == sorted(OFFICES), texts
