"""Prompt templates: find them (file or recipe), check their variables against the table, render rows.

Variables are checked against the input's columns before any model loads, so a typo in a template
costs seconds, not a model load. A variable used with the `default` filter or an `is defined` test
is optional: the template author planned for it to be missing.

Templates come from files and recipes that anyone may have written, and render values that anyone may
have typed, so they render in Jinja2's immutable sandbox: no attribute escapes (`__class__`,
`__globals__`), no mutation of row values, `range()` capped at jinja2.sandbox.MAX_RANGE, and `*`/`**`
bounded so one expression cannot allocate gigabytes; calls, filters and `%` that would build a huge
string, and loops that would run for ever, are refused before they run (template_limits.py), and the
rendered prompt is streamed and stopped past a character budget. A sandbox violation is a per-row
template error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from batchllm_cli.template_limits import LoopBudget, check_call, check_percent, check_str_format, guarded_filter

import recipes
from batchllm_cli.errors import UsageError

_OPTIONAL_FILTERS = frozenset({"default", "d"})
_OPTIONAL_TESTS = frozenset({"defined", "undefined"})
# Largest string/list a template may build with `*`, and the most bits of an integer it may build with
# `**`: far above any prompt, far below what exhausts memory or time.
MAX_REPEAT_LEN = 1 << 24
MAX_POWER_BITS = 1 << 16
# Most characters one row's template may render: a prompt longer than this fits no model's context
# (a --truncate run cuts prompts; without it the limit is the context's own character bound).
MAX_RENDER_CHARS = 1 << 25


@dataclass(frozen=True)
class TemplateSource:
    """Where a template came from and its text; `recipe` is set when it is a bundled recipe."""

    name: str
    text: str
    recipe: recipes.Recipe | None = None


NULL_POLICIES = ("error", "empty")
# Every row is also the variable `row` (unless a column, --var or --param is itself called row), so a
# column whose name is no Python name is still reachable: {{ row["customer-name"] }}.
ROW_VARIABLE = "row"


class RowRenderError(Exception):
    """One row could not be rendered; the message (one line) goes into the row's error column.

    `kind` names the error for the errors file: template_error or null_value.
    """

    def __init__(self, message: str, kind: str = "template_error") -> None:
        super().__init__(message)
        self.kind = kind


class _NullValue(Exception):
    """A null (or NaN) value was about to be printed into a prompt under --nulls error."""


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def resolve_template(arg: str) -> TemplateSource:
    """An existing file wins; otherwise `arg` may name a recipe (`classify` or `classify.j2`)."""
    path = Path(arg)
    if path.is_file():
        try:
            # utf-8-sig: a byte order mark (Windows editors write one) is not text of the prompt
            return TemplateSource(name=str(path), text=path.read_text(encoding="utf-8-sig"))
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


def _bytes_text(value: bytes) -> str:
    # A binary cell prints as its UTF-8 text, bytes that are not UTF-8 as \xHH: never Python's b'...'.
    return value.decode("utf-8", errors="backslashreplace")


def _json_ready(value: Any) -> Any:
    """`value` with what JSON has no literal for replaced: NaN as null (a NaN cell is a null, as printed
    alone), infinities as the strings "Infinity" / "-Infinity" (as JSON output writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    # Values JSON has no type for (decimals, dates, times, durations, UUIDs, binary) as the text a
    # template prints for them alone.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_text(bytes(value))
    return str(value)


def _json_dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps with the prompt value policy: `{{ row }}`, list/struct/map cells and `| tojson` all
    write valid JSON, whatever the cells hold."""
    return json.dumps(_json_ready(value), default=_json_default, allow_nan=False, **kwargs)


def _as_text(value: Any) -> Any:
    # A list, struct or map column (or a nested value) prints as JSON, the form models read best,
    # never as Python's repr (single quotes, None, True).
    if isinstance(value, (list, tuple, dict)):
        return _json_dumps(value, ensure_ascii=False)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_text(bytes(value))
    return value


def _finalize_empty(value: Any) -> Any:
    # --nulls empty: a null cell renders as an empty string, never the word "None" or "nan".
    return "" if _is_null(value) else _as_text(value)


def _finalize_error(value: Any) -> Any:
    # --nulls error (the default): printing a null into a prompt makes the row an error row.
    if _is_null(value):
        raise _NullValue()
    return _as_text(value)


class PromptTooLong(RowRenderError):
    """The rendered prompt passed the character budget it was rendered with (`chars` so far)."""

    def __init__(self, chars: int, limit: int) -> None:
        super().__init__(f"template error: the prompt is longer than {limit} characters")
        self.chars = chars


class _PromptEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*`, `**`, `%`, calls, filters and loops checked before they run
    (the sandbox only caps range)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = {name: guarded_filter(name, f) for name, f in self.filters.items()}
        self.loop_budget = LoopBudget()

    def _generate(self, source: nodes.Template, *args: Any, **kwargs: Any) -> str:
        # Every loop's iterable goes through the per-render loop budget.
        for loop in source.find_all(nodes.For):
            budget = nodes.Getattr(nodes.EnvironmentAttribute("loop_budget"), "iterate", "load")
            loop.iter = nodes.Call(budget, [loop.iter], [], None, None)
        return super()._generate(source, *args, **kwargs)  # type: ignore[misc]

    def wrap_str_format(self, value: Any) -> Any:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        text = value.__self__

        def checked(*args: Any, **kwargs: Any) -> Any:
            if value.__name__ == "format_map":
                check_str_format(str(text), (), dict(args[0]) if args and isinstance(args[0], Mapping) else {})
            else:
                check_str_format(str(text), args, kwargs)
            return formatter(*args, **kwargs)

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            check_percent(left, right)
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT_LEN:
                    raise SecurityError(f"a repetition of {len(seq) * times} items is too large (limit {MAX_REPEAT_LEN})")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and abs(left).bit_length() * right > MAX_POWER_BITS:
                raise SecurityError(f"{left} ** {right} is too large (limit {MAX_POWER_BITS} bits)")
        return super().call_binop(context, operator, left, right)


def _make_environment(nulls: str = "error") -> jinja2.Environment:
    # Prompts are plain text: no HTML autoescaping. StrictUndefined turns a missing key (e.g. a
    # field of a struct column absent in one row) into a per-row error instead of a silent blank.
    finalize = _finalize_empty if nulls == "empty" else _finalize_error
    env = _PromptEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, finalize=finalize, keep_trailing_newline=False
    )
    env.policies["json.dumps_function"] = _json_dumps  # `| tojson` writes cells as `{{ row }}` does
    return env


def _value_names(ast: nodes.Template) -> set[str]:
    """Names read as values somewhere in the template (`{{ range }}`, `cycler.x`), not only called."""
    called = {id(call.node) for call in ast.find_all(nodes.Call) if isinstance(call.node, nodes.Name)}
    return {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load" and id(n) not in called}


# `row.items`, `row.get(...)`: the mapping's own methods, not a column.
_MAPPING_ATTRS = frozenset(dir(dict))


def _row_keys(ast: nodes.Template) -> set[str] | None:
    """The columns read through the whole-row variable (`row["customer-name"]`, `row.text`), or None
    when `row` is also used in another way (printed, indexed by a variable, iterated): then every
    column may be read."""
    keys: set[str] = set()
    keyed: set[int] = set()
    for node in ast.find_all((nodes.Getitem, nodes.Getattr)):
        if not (isinstance(node.node, nodes.Name) and node.node.name == ROW_VARIABLE):
            continue
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            keys.add(node.arg.value)
        elif isinstance(node, nodes.Getattr) and node.attr not in _MAPPING_ATTRS:
            keys.add(node.attr)
        else:
            continue
        keyed.add(id(node.node))
    for name in ast.find_all(nodes.Name):
        if name.name == ROW_VARIABLE and name.ctx == "load" and id(name) not in keyed:
            return None
    return keys


def _optional_names(ast: nodes.Template) -> set[str]:
    """Names that appear at least once under `| default(...)` or `is defined` / `is undefined`."""
    names: set[str] = set()
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        wanted = _OPTIONAL_FILTERS if isinstance(node, nodes.Filter) else _OPTIONAL_TESTS
        if node.name in wanted and isinstance(node.node, nodes.Name):
            names.add(node.node.name)
    return names


class PromptTemplate:
    """A compiled template with its variables split into required and optional.

    `nulls` is what a null cell printed into the prompt does: "error" (the row becomes an error row,
    the default) or "empty" (it renders as empty text). A null in an optional variable (one used with
    `default` or `is defined`) counts as missing, so the template's default applies.
    """

    def __init__(
        self,
        source: TemplateSource,
        nulls: str = "error",
        variables: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        if nulls not in NULL_POLICIES:
            raise ValueError(f"nulls must be one of {NULL_POLICIES}")
        self.source = source
        self.nulls = nulls
        self.variables: dict[str, str] = dict(variables or {})  # template variable -> column (--var)
        self.params: dict[str, str] = dict(params or {})  # template variable -> constant text (-p)
        env = _make_environment(nulls)
        try:
            ast = env.parse(source.text)
            # A name read as a value is a column like any other, even when Jinja has a global of that
            # name (range, dict, cycler, namespace, ...): without the global it is checked against the
            # columns and renders the column's value. A name only called (`range(3)`) keeps its global.
            for name in _value_names(ast) & set(env.globals):
                del env.globals[name]
            ast = env.parse(source.text)
            self._template = env.from_string(source.text)
            self._loop_budget = env.loop_budget
        except jinja2.TemplateSyntaxError as exc:
            raise UsageError(
                f"Template {source.name} has a syntax error on line {exc.lineno}: {exc.message}"
            ) from exc
        # There is no template loader (a template is one file): another template would fail every row.
        for node in ast.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
            tag = {nodes.Include: "include", nodes.Extends: "extends"}.get(type(node), "import")
            raise UsageError(f"Template {source.name} uses {{% {tag} %}} on line {node.lineno}, but a template is "
                             "one file; copy the other template's text into it instead.")
        variables = meta.find_undeclared_variables(ast)
        optional = _optional_names(ast) & variables
        self.required_variables: frozenset[str] = frozenset(variables - optional)
        self.optional_variables: frozenset[str] = frozenset(optional)
        self._row_keys = _row_keys(ast) if ROW_VARIABLE in variables else set()
        for flag, names in (("--var", self.variables), ("--param", self.params)):
            unused = sorted(set(names) - variables)
            if unused:
                raise UsageError(
                    f"{flag} {', '.join(unused)}: template {source.name} has no such variable; its variables: "
                    f"{', '.join(sorted(variables)) or '(none)'}."
                )

    def _row_is_variable(self, columns: Sequence[str]) -> bool:
        return ROW_VARIABLE not in columns and ROW_VARIABLE not in self.variables and ROW_VARIABLE not in self.params

    def given_variables(self, columns: Sequence[str]) -> set[str]:
        """The variables rows supply: the columns, and those set by --var and --param."""
        return set(columns) | set(self.variables) | set(self.params)

    def columns_read(self, columns: Sequence[str]) -> list[str]:
        """The columns (of `columns`, in their order) that rendering may read."""
        if self._row_is_variable(columns) and self._row_keys is None:
            return list(columns)
        wanted = {self.variables.get(v, v) for v in self.required_variables | self.optional_variables
                  if v not in self.params}
        if self._row_is_variable(columns):
            wanted |= self._row_keys
        return [c for c in columns if c in wanted]

    def check_columns(self, columns: Sequence[str]) -> None:
        """UsageError naming every required variable that is not a column (nor set by --var/--param),
        every --var column and row["..."] key that is not a column, and the columns there are."""
        available = ", ".join(columns) if columns else "(none)"
        bad = sorted({c for c in self.variables.values() if c not in columns})
        if bad:
            raise UsageError(f"--var: {', '.join(bad)} {'are not columns' if len(bad) > 1 else 'is not a column'} "
                             f"of the input; available columns: {available}.")
        needed = self.required_variables - set(self.params) - set(self.variables)
        if self._row_is_variable(columns):
            # (no keys to check when `row` is read whole or by computed keys: _row_keys is None)
            needed = (needed - {ROW_VARIABLE}) | {f'row["{k}"]' for k in self._row_keys or () if k not in columns}
        missing = sorted(needed - set(columns))
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise UsageError(
                f"Template {self.source.name} uses variable{plural} {', '.join(missing)} that "
                f"{'are not columns' if plural else 'is not a column'} of the input; available columns: {available}. "
                "Map a variable to a column with --var NAME=COLUMN, or set it with --param NAME=VALUE."
            )

    def context(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The template's variables for one row: its columns, the whole row as `row`, --var columns
        and --param constants (the flags win over a column of the same name)."""
        ctx = dict(row)
        if self._row_is_variable(list(row)):
            ctx[ROW_VARIABLE] = row
        ctx.update(self.params)
        for name, column in self.variables.items():
            ctx[name] = row.get(column)
        return ctx

    def render(self, row: Mapping[str, Any], max_chars: int | None = None) -> str:
        """The prompt for one row; RowRenderError (one line) when this row cannot be rendered, and
        PromptTooLong as soon as it passes `max_chars` (MAX_RENDER_CHARS at most)."""
        row = self.context(row)
        if self.optional_variables and any(_is_null(row.get(k)) for k in self.optional_variables):
            row = {k: v for k, v in row.items() if not (k in self.optional_variables and _is_null(v))}
        limit = min(max_chars, MAX_RENDER_CHARS) if max_chars is not None else MAX_RENDER_CHARS
        self._loop_budget.reset()
        parts: list[str] = []
        chars = 0
        try:
            for part in self._template.generate(row):
                chars += len(part)
                if chars > limit:
                    raise PromptTooLong(chars, limit)
                parts.append(part)
            return "".join(parts)
        except RowRenderError:
            raise
        except _NullValue:
            whole = row.get(ROW_VARIABLE) if isinstance(row.get(ROW_VARIABLE), Mapping) else {}
            names = sorted({self.variables.get(k, k) for k in self.required_variables if _is_null(row.get(k, 0))}
                           | {k for k in self._row_keys or () if _is_null(whole.get(k, 0))})
            if len(names) > 1:
                where = f"columns {', '.join(names[:-1])} and {names[-1]} are null"
            else:
                where = f"column {names[0]} is null" if names else "a null value"
            raise RowRenderError(
                f"null value: {where} in this row; fix the input, or pass --nulls empty to render nulls "
                "as empty text.",
                kind="null_value",
            ) from None
        except Exception as exc:  # any error inside a template (bad filter input, type error) is per-row
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise RowRenderError(f"template error: {message}") from exc
