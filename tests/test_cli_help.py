"""The CLI surface without a model: --help documents everything, bad invocations exit 2 early."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.main import get_command

from batchllm_cli.app import app
from batchllm_cli.table_io import OUTPUT_FORMATS
from reliability_utils import flat, invoke


def test_every_command_and_option_is_in_help() -> None:
    # Typer vendors its own click, so the command tree is inspected by duck typing.
    group = get_command(app)
    top = invoke(["--help"])
    assert top.exit_code == 0, top.output
    assert {"run", "recipes"} <= set(group.commands)
    for name, command in group.commands.items():
        assert name in top.output
        assert command.help, f"command {name} has no help text"
        result = invoke([name, "--help"])
        assert result.exit_code == 0, result.output
        for param in command.params:
            if param.param_type_name == "argument":
                assert (param.metavar or param.name.upper()) in result.output
                assert param.help, f"{name} argument {param.name} has no help text"
                continue
            assert param.param_type_name == "option"
            assert param.help, f"{name} {param.opts} has no help text"
            for opt in param.opts + param.secondary_opts:
                assert opt in result.output, f"{opt} missing from `batchllm {name} --help`"


def test_exit_codes_are_documented() -> None:
    for args in (["--help"], ["run", "--help"]):
        text = flat(invoke(args).output)
        for phrase in ("0 all rows done", "1 fatal error", "2 usage error", "3 finished"):
            assert phrase in text


def test_status_help_shows_its_own_exit_codes() -> None:
    text = flat(invoke(["status", "--help"]).output)
    for phrase in ("0 finished", "3 finished, but some rows are in error", "10 running", "11 interrupted",
                   "12 not started", "2 usage error"):
        assert phrase in text
    assert "0 all rows done" not in text and "130/143" not in text  # run's codes are not status's


def test_recipes_command_lists_recipes() -> None:
    result = invoke(["recipes"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["classify", "extract", "summarize"]
    assert all(len(line.split()) > 3 for line in lines)  # each has a description


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything gets as far as building the demo model or loading weights."""
    import engine.demo_model
    import engine.llm_engine

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a usage error must be found before the model is touched")

    monkeypatch.setattr(engine.demo_model, "ensure_demo_model", forbidden)
    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", forbidden)


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "in.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["title", "body"], ["a", "x"], ["b", "y"]])
    return path


def assert_usage_error(result, *phrases: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, message  # one line
    for phrase in phrases:
        assert phrase in message


def test_missing_input(no_model: None, tmp_path: Path) -> None:
    result = invoke(["run", str(tmp_path / "nope.csv"), "-t", "classify", "-o", str(tmp_path / "o.parquet")])
    assert_usage_error(result, "Input file not found")


def test_unknown_template_variable_lists_columns(no_model: None, table: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "t.j2"
    tpl.write_text("Summarize {{ titel }}: {{ body }}")
    result = invoke(["run", str(table), "-t", str(tpl), "-o", str(tmp_path / "o.parquet")])
    assert_usage_error(result, "titel", "available columns: title, body")
    # the recipe needs `text`, which this table lacks
    result = invoke(["run", str(table), "-t", "classify", "-o", str(tmp_path / "o.parquet")])
    assert_usage_error(result, "text", "title, body")


def test_output_same_as_input(no_model: None, table: Path) -> None:
    result = invoke(["run", str(table), "-t", "classify", "-o", str(table)])
    assert_usage_error(result, "is the input")


def test_unknown_template_and_bad_output_type(no_model: None, table: Path, tmp_path: Path) -> None:
    assert_usage_error(invoke(["run", str(table), "-t", "nope", "-o", str(tmp_path / "o.csv")]), "neither a file")
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ body }}")
    assert_usage_error(invoke(["run", str(table), "-t", str(tpl), "-o", str(tmp_path / "o.txt")]), "unknown file type")


def test_output_column_clash(no_model: None, table: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ body }}")
    result = invoke(["run", str(table), "-t", str(tpl), "-o", str(tmp_path / "o.csv"), "--column", "title"])
    assert_usage_error(result, "title", "--column")


def test_unusable_model_dir(table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.llm_engine

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", lambda *a, **k: pytest.fail("weights loaded"))
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ body }}")
    args = ["run", str(table), "-t", str(tpl), "-o", str(tmp_path / "o.csv"), "--model"]
    assert_usage_error(invoke(args + [str(tmp_path / "no-model")]), "not found")
    (tmp_path / "empty").mkdir()
    assert_usage_error(invoke(args + [str(tmp_path / "empty")]), "config.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    # config.json is read (for the context length) before the tokenizer: its problem is named first.
    assert_usage_error(invoke(args + [str(tmp_path / "broken")]), "config.json", "not supported")


def test_bad_size_flag(no_model: None, table: Path, tmp_path: Path) -> None:
    result = invoke(["run", str(table), "-t", "classify", "-o", str(tmp_path / "o.csv"), "--kv-cache-memory", "lots"])
    assert result.exit_code == 2
    assert "2GiB" in result.output


def test_parse_size() -> None:
    from batchllm_cli.options import parse_size

    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096


def test_bad_gpu_memory_utilization(no_model: None, table: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.csv")
    result = invoke(["run", str(table), "-t", "classify", "-o", out, "--gpu-memory-utilization", "1.5"])
    assert result.exit_code == 2
    assert "--gpu-memory-utilization" in flat(result.output)


def test_piped_help_on_a_narrow_terminal_keeps_every_option_name() -> None:
    """`batchllm run --help | grep gpu-memory-utilization` on a 40-column terminal finds the flag:
    names are never cut to fit, and boolean flags read as flags (--chat / --no-chat), not <bool>."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, COLUMNS="40", PYTHONPATH=str(root))
    env.pop("TERMINAL_WIDTH", None)
    group = get_command(app)
    for name in ("run", "analyze"):
        proc = subprocess.run([sys.executable, "-m", "batchllm_cli", name, "--help"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert "<bool>" not in text and "…" not in text
        assert "--chat / --no-chat" in text
        assert name != "run" or "--gpu-memory-utilization" in text.split()
        for param in group.commands[name].params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    assert opt in text.split(), f"{opt} is not whole in piped `batchllm {name} --help`"


def test_every_option_the_readme_names_exists() -> None:
    # The README once told users to set --max-num-seqs, which no command has.
    import re

    group = get_command(app)
    known = {opt for command in group.commands.values() for param in command.params
             for opt in (*param.opts, *param.secondary_opts)} | {"--help", "--version"}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    # the user's part: benchmark scripts' own flags are documented from "## Benchmarks" on
    lines = [ln for ln in readme.split("\n## Benchmarks")[0].splitlines() if "bench/" not in ln]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", "\n".join(lines)))
    assert sorted(named - known) == []


def test_run_help_lists_every_output_type() -> None:
    """--output's help used to leave out .ndjson, which run accepts (and the README lists)."""
    run = get_command(app).commands["run"]
    output_help = next(p.help for p in run.params if "--output" in p.opts)
    for suffix in OUTPUT_FORMATS:
        assert suffix in output_help, f"{suffix} missing from the help of `batchllm run --output`"
