"""The README's two top commands are the contract with a new user and with CI."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _top_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands() -> None:
    commands = _top_commands()
    assert len(commands) == 2
    assert "pip install -e '.[test]'" in commands[0] and "batchllm run examples/" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_install_and_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup, test = _top_commands()
    assert test in ci.splitlines()
    assert "python3 -m venv .venv" in setup and "python3 -m venv .venv" in ci
    assert ".venv/bin/pip install -e '.[test]'" in ci


def test_demo_example_table_exists() -> None:
    setup = _top_commands()[0]
    example = setup.split("batchllm run ", 1)[1].split()[0]
    assert (ROOT / example).is_file()


def test_readme_cites_the_paper_and_speaks_to_users() -> None:
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "2412.03594" in text  # the BatchLLM paper, where the plan is explained
    assert "0-based" in text  # what `row` in the errors file counts from
    # Words from how the project was built, not from how it is used.
    for pattern in (r"\bgoal\b", r"\bsessions?\b", r"\bissue #?\d+", r"(?<![\w/])#\d+\b", r"\bour shared\b",
                    r"\bthis project's\b"):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
