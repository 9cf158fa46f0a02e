"""Templates are untrusted code: they render in Jinja2's immutable sandbox, with bounded `range`, `*`
and `**`, and a name like a Jinja global (`range`, `cycler`, ...) is a column like any other."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from batchllm_cli.errors import UsageError
from batchllm_cli.templates import PromptTemplate, RowRenderError, TemplateSource
from reliability_utils import FAST, flat, invoke, read_jsonl, read_rows, write_template

JINJA_GLOBALS = ("range", "dict", "cycler", "joiner", "namespace", "lipsum")


def template(text: str) -> PromptTemplate:
    return PromptTemplate(TemplateSource(name="t.j2", text=text))


@pytest.mark.parametrize(
    "text",
    [
        "{{ text.__class__.__mro__[1].__subclasses__() }}",
        "{{ joiner().__init__.__globals__.os.popen('touch PWNED') }}",
        "{{ namespace().__init__.__globals__ }}",
        "{% set x = [] %}{{ x.append(1) }}",  # immutable: row values and template lists stay as they are
        "{{ range(10**12) | list | length }}",
        "{% for i in range(10**12) %}{% endfor %}",
        "{{ 'a' * 10**10 }}",
        "{{ [text] * 10**9 }}",
        "{{ 7 ** (10**9) }}",
    ],
)
def test_unsafe_or_unbounded_expressions_are_row_errors_and_fail_fast(text: str) -> None:
    t = template(text)
    t.check_columns(["text"])
    start = time.monotonic()
    with pytest.raises(RowRenderError) as info:
        t.render({"text": "hi"})
    assert time.monotonic() - start < 2
    assert info.value.kind == "template_error" and str(info.value).startswith("template error: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", JINJA_GLOBALS)
def test_a_name_like_a_jinja_global_is_a_column(name: str) -> None:
    t = template(f"[{{{{ {name} }}}}]")
    assert t.required_variables == {name}
    with pytest.raises(UsageError, match=f"uses variable {name} that is not a column.*available columns: text"):
        t.check_columns(["text"])
    t.check_columns(["text", name])
    assert t.render({"text": "x", name: "the value"}) == "[the value]"


def test_a_global_only_called_keeps_working_and_an_optional_one_is_undefined() -> None:
    t = template("{% for i in range(3) %}{{ i }}{% endfor %} {{ text }}")
    assert t.required_variables == {"text"}
    assert t.render({"text": "x"}) == "012 x"
    optional = template("{{ text }}|{{ dict | default('none') }}|{% if cycler is defined %}c{% endif %}")
    assert optional.optional_variables == {"dict", "cycler"}
    assert optional.render({"text": "x"}) == "x|none|"  # not "<class 'dict'>", not the cycler class
    assert optional.render({"text": "x", "dict": "d", "cycler": 1}) == "x|d|c"


def test_cli_sandbox_attack_never_runs_and_is_reported(tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inp = tmp_path / "in.csv"
    inp.write_text("id,cycler\n1,a\n2,b\n")
    out = tmp_path / "o.csv"
    attack = "{{ cycler.__init__.__globals__.os.popen('touch pwned') }}"
    # With no column named cycler, the template is refused before the model loads.
    write_template(tmp_path / "a.j2", attack)
    (tmp_path / "in2.csv").write_text("id,text\n1,a\n")
    refused = invoke(["run", str(tmp_path / "in2.csv"), "-t", str(tmp_path / "a.j2"), "-o", str(out), *FAST])
    assert refused.exit_code == 2, refused.output
    assert "uses variable cycler that is not a column" in flat(refused.stderr)
    # With a column named cycler, every row is an error row naming the sandbox, and nothing ran.
    result = invoke(["run", str(inp), "-t", str(tmp_path / "a.j2"), "-o", str(out), *FAST])
    assert result.exit_code == 3, result.output
    assert not (tmp_path / "pwned").exists()
    errors = read_jsonl(out.with_name(out.name + ".errors.jsonl"))
    assert [e["error_type"] for e in errors] == ["template_error", "template_error"]
    assert all("unsafe" in e["error"] for e in errors)
    assert [r["cycler"] for r in read_rows(out)] == ["a", "b"]
