"""Prompt templates: find them (file or recipe), check their variables against the table, render rows.

Variables are checked against the input's columns before any model loads, so a typo in a template
costs seconds, not a model load. A variable used with the `default` filter or an `is defined` test
is optional: the template author planned for it to be missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import meta, nodes

import recipes
from batchllm_cli.errors import UsageError

_OPTIONAL_FILTERS = frozenset({"default", "d"})
_OPTIONAL_TESTS = frozenset({"defined", "undefined"})


@dataclass(frozen=True)
class TemplateSource:
    """Where a template came from and its text; `recipe` is set when it is a bundled recipe."""

    name: str
    text: str
    recipe: recipes.Recipe | None = None


class RowRenderError(Exception):
    """One row could not be rendered; the message (one line) goes into the row's error column."""


def resolve_template(arg: str) -> TemplateSource:
    """An existing file wins; otherwise `arg` may name a recipe (`classify` or `classify.j2`)."""
    path = Path(arg)
    if path.is_file():
        try:
            return TemplateSource(name=str(path), text=path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"Cannot read template {path}: {exc}") from exc
    try:
        recipe = recipes.load_recipe(arg)
    except LookupError:
        raise UsageError(
            f"Template {arg!r} is neither a file nor a recipe; recipes: "
            f"{', '.join(recipes.recipe_names())} (see `batchllm recipes`)."
        ) from None
    return TemplateSource(name=f"recipe:{recipe.name}", text=recipe.text, recipe=recipe)


def _finalize(value: Any) -> Any:
    # A null cell renders as an empty string, not the word "None" (which would leak into prompts).
    return "" if value is None else value


def _make_environment() -> jinja2.Environment:
    # Prompts are plain text: no HTML autoescaping. StrictUndefined turns a missing key (e.g. a
    # field of a struct column absent in one row) into a per-row error instead of a silent blank.
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined, autoescape=False, finalize=_finalize, keep_trailing_newline=False
    )


def _optional_names(ast: nodes.Template) -> set[str]:
    """Names that appear at least once under `| default(...)` or `is defined` / `is undefined`."""
    names: set[str] = set()
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        wanted = _OPTIONAL_FILTERS if isinstance(node, nodes.Filter) else _OPTIONAL_TESTS
        if node.name in wanted and isinstance(node.node, nodes.Name):
            names.add(node.node.name)
    return names


class PromptTemplate:
    """A compiled template with its variables split into required and optional."""

    def __init__(self, source: TemplateSource) -> None:
        self.source = source
        env = _make_environment()
        try:
            ast = env.parse(source.text)
            self._template = env.from_string(source.text)
        except jinja2.TemplateSyntaxError as exc:
            raise UsageError(
                f"Template {source.name} has a syntax error on line {exc.lineno}: {exc.message}"
            ) from exc
        variables = meta.find_undeclared_variables(ast)
        optional = _optional_names(ast) & variables
        self.required_variables: frozenset[str] = frozenset(variables - optional)
        self.optional_variables: frozenset[str] = frozenset(optional)

    def check_columns(self, columns: Sequence[str]) -> None:
        """UsageError naming every required variable that is not a column, and the columns there are."""
        missing = sorted(self.required_variables - set(columns))
        if missing:
            plural = "s" if len(missing) > 1 else ""
            available = ", ".join(columns) if columns else "(none)"
            raise UsageError(
                f"Template {self.source.name} uses variable{plural} {', '.join(missing)} that "
                f"{'are' if plural else 'is'} not column{plural} of the input; available columns: {available}."
            )

    def render(self, row: Mapping[str, Any]) -> str:
        """The prompt for one row; RowRenderError (one line) when this row cannot be rendered."""
        try:
            return self._template.render(row)
        except Exception as exc:  # any error inside a template (bad filter input, type error) is per-row
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise RowRenderError(f"template error: {message}") from exc
