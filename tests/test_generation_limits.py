"""Generation settings a script gets wrong: a --max-tokens (given or the default) that fills the model's
context, and an empty --stop. Each is one line and exit 2, before anything is written."""
from __future__ import annotations

from pathlib import Path

import pytest

import model_factory
from reliability_utils import invoke, one_error_line


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    variant = model_factory.Variant("short", "llama", "v5", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                             "max_position_embeddings": 64}, seed=1)
    return model_factory.build_model_dir(variant, tmp_path_factory.mktemp("short-context"))


def _job(tmp_path: Path) -> tuple[Path, Path]:
    inp = tmp_path / "in.csv"
    inp.write_text("text\nhi\n")
    tpl = tmp_path / "t.j2"
    tpl.write_text("Say: {{ text }}")
    return inp, tpl


@pytest.mark.parametrize("command", ["run", "analyze"])
def test_a_max_tokens_filling_the_context_says_whether_it_was_the_default(
    short_context_model: Path, tmp_path: Path, command: str
) -> None:
    inp, tpl = _job(tmp_path)
    out = ["-o", str(tmp_path / "out.csv")] if command == "run" else []
    base = [command, str(inp), "-t", str(tpl), "-m", str(short_context_model), *out]
    defaulted = invoke(base)
    assert defaulted.exit_code == 2, defaulted.output
    line = one_error_line(defaulted.stderr)
    assert "--max-tokens 256 (the default when --max-tokens is not given)" in line and "context of 64" in line
    given = invoke([*base, "--max-tokens", "100"])
    assert given.exit_code == 2, given.output
    line = one_error_line(given.stderr)
    assert "--max-tokens 100 leaves no room" in line and "default" not in line
    assert not (tmp_path / "out.csv").exists()


def test_an_empty_stop_string_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    """An empty --stop (a script's --stop "$VAR" with VAR unset) would end no answer: refused, as vLLM does."""
    inp, tpl = _job(tmp_path)
    result = invoke(["run", str(inp), "-t", str(tpl), "-o", str(tmp_path / "out.csv"), "--stop", ""])
    assert result.exit_code == 2, result.output
    assert '--stop "" is an empty stop string' in one_error_line(result.stderr)
    assert not (tmp_path / "out.csv").exists()
