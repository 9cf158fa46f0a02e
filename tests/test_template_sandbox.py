"""Templates are untrusted code: they render in Jinja2's immutable sandbox, with bounded `range`, `*`
and `**`, and a name like a Jinja global (`range`, `cycler`, ...) is a column like any other."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from batchllm_cli.errors import UsageError
from batchllm_cli.templates import PromptTemplate, PromptTooLong, RowRenderError, TemplateSource
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
        # One call or operator building a huge string (refused from its arguments, before it runs).
        "{{ '%1000000000d' % 1 }}",
        "{{ '%.1000000000f' % 1 }}",
        "{{ '%*d' % (10**9, 1) }}",
        "{{ '%1000000000d' | format(1) }}",
        "{{ 'x' | center(10**9) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=10**9) }}",
        "{{ '{x:>1000000000}'.format_map({'x': 1}) }}",
        "{{ 'a' | indent(10**9) }}",
        "{{ ('a\n' * 100000) | indent(1000) }}",
        "{{ 'a b c' | wordwrap(1, wrapstring='x' * 10**7) }}",
        "{{ lipsum(10**6) }}",
        "{{ 'x'.ljust(10**9) }}",
        "{{ 'x'.zfill(10**9) }}",
        "{{ ('\t' * 1000).expandtabs(10**7) }}",
        "{{ (text * 10000).replace('h', 'y' * 10000) }}",
        "{{ (text * 10000) | replace('h', 'y' * 10000) }}",
        "{{ range(99999) | map('string') | join('y' * 10000) }}",
        "{{ ('y' * 10000).join('x' * 99999) }}",
        "{{ [1] | batch(10**9, 0) | list }}",
        "{{ [1] | slice(10**9, 0) | list }}",
        "{{ {'a': [1, [2]]} | tojson(indent=10**9) }}",
        "{{ ('x' * 1000).translate({120: 'y' * 100000}) }}",
        # Loops: all of one row's loops together are bounded, with or without output.
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
        "{% for c in 'x' * 16000000 %}{% endfor %}",
        # Many pieces of allowed size: the rendered prompt itself is bounded.
        "{% for i in range(3000) %}{{ 'x' * 16000 }}{% endfor %}",
    ],
)
def test_unsafe_or_unbounded_expressions_are_row_errors_and_fail_fast(text: str) -> None:
    t = template(text)
    t.check_columns(["text"])
    start = time.monotonic()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RowRenderError) as info:
        t.render({"text": "hi"})
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB: no huge string
    assert info.value.kind == "template_error" and str(info.value).startswith("template error: ")
    assert "\n" not in str(info.value)


def test_ordinary_formatting_filters_and_loops_still_render() -> None:
    t = template(
        "{{ '%-4s|%5.1f' % (text, 2.25) }}|{{ '{:>5}|{:,}'.format(text, 1234567890) }}|{{ text | center(6) }}|"
        "{{ 'a\nb' | indent(2) }}|{{ '%03d' | format(7) }}|{{ [1, 2] | join(', ') }}|{{ lipsum(1, false, 3, 5) | length > 0 }}|"
        "{% for i in range(3) %}{{ loop.index }}/{{ loop.length }}{% endfor %}|{{ text.ljust(4, '.') }}"
    )
    assert t.render({"text": "hi"}) == "hi  |  2.2|   hi|1,234,567,890|  hi  |a\n  b|007|1, 2|True|1/32/33/3|hi.."


def test_a_render_stops_at_its_character_budget() -> None:
    t = template("{% for i in range(1000) %}{{ text }}{% endfor %}")
    assert len(t.render({"text": "abc"})) == 3000
    with pytest.raises(PromptTooLong) as info:
        t.render({"text": "abc"}, max_chars=100)
    assert 100 < info.value.chars <= 103


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
