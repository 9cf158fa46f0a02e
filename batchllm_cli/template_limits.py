"""Size and step limits for prompt templates, checked before the work is done.

Jinja's sandbox stops attribute escapes but not a template that builds a huge string in one call
(`'%1000000000d' % 1`, `'x'|center(10**9)`, `"{:>1000000000}".format(1)`, `lipsum(10**6)`) or loops
for ever without output (nested `range(99999)`). So:
- every call, filter and `%` whose result size is known from its arguments is refused when that size
  is over MAX_BUILD_LEN (`check_call`, `check_filter`, `check_percent`);
- all `for` loops of one render together take at most MAX_LOOP_STEPS items (`LoopBudget`);
- the rendered prompt is streamed and stopped past a character budget (`templates.PromptTemplate`).
Each refusal is a SecurityError: a per-row template error, raised in microseconds.
"""
from __future__ import annotations

import re
import string
from typing import Any, Callable, Iterable, Iterator

from jinja2.sandbox import SecurityError
from jinja2.utils import generate_lorem_ipsum

# Largest string or list one expression may build: far above any prompt, far below what exhausts memory.
MAX_BUILD_LEN = 1 << 24
# Loop items per render (all loops together): a table row's template needs thousands, not millions.
MAX_LOOP_STEPS = 1 << 20
# A printf conversion: flags, width, precision (each may be `*`, taken from the arguments).
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?")
_DIGITS = re.compile(r"\d+")


def _check(size: int, what: str) -> None:
    if size > MAX_BUILD_LEN:
        raise SecurityError(f"{what} would build {size} items (limit {MAX_BUILD_LEN})")


def _int_args(args: Iterable[Any]) -> int:
    return max((abs(a) for a in args if isinstance(a, int) and not isinstance(a, bool)), default=0)


def check_percent(fmt: Any, args: Any) -> None:
    """`fmt % args` (and the `format` filter): no field wider or more precise than the limit."""
    if not isinstance(fmt, str):
        return
    values = args if isinstance(args, (tuple, list)) else (args,)
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for part in (width, precision):
            n = _int_args(values) if part == "*" else int(part or 0)
            _check(n, f"the format {fmt[:40]!r}")


def check_str_format(fmt: str, args: Iterable[Any], kwargs: dict[str, Any]) -> None:
    """`fmt.format(...)`: no field spec with a number (its width or precision) over the limit; a spec
    that takes its width from an argument (`{:>{w}}`) is bounded by the largest integer argument."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            _check(_int_args(list(args) + list(kwargs.values())), f"the format {fmt[:40]!r}")
            check_str_format(spec, args, kwargs)
        for digits in _DIGITS.findall(spec):
            _check(int(digits), f"the format {fmt[:40]!r}")


def _joined_size(sep: Any, items: Any) -> int:
    return len(sep) * max(len(items) - 1, 0) if isinstance(sep, str) and hasattr(items, "__len__") else 0


def _replaced_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1


def _translated_size(s: Any, table: Any) -> int:
    if not isinstance(s, str) or not isinstance(table, dict):
        return 0
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(s) * longest


# Result size of a str method from (the string, its arguments).
_STR_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *a: int(width) if isinstance(width, int) else 0,
    "ljust": lambda s, width=0, *a: int(width) if isinstance(width, int) else 0,
    "rjust": lambda s, width=0, *a: int(width) if isinstance(width, int) else 0,
    "zfill": lambda s, width=0, *a: int(width) if isinstance(width, int) else 0,
    "expandtabs": lambda s, tabsize=8, *a: s.count("\t") * tabsize if isinstance(tabsize, int) else 0,
    "replace": _replaced_size,
    "join": _joined_size,
    "translate": _translated_size,
}

# Result size of a filter from (its value, its arguments), keyword arguments by name.
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80, **kw: width if isinstance(width, int) else 0,
    "indent": lambda value, width=4, first=False, blank=False, **kw: _lines(value) * (
        width if isinstance(width, int) else len(str(width))
    ),
    "wordwrap": lambda value, width=79, break_long_words=True, wrapstring=None, **kw: (
        len(wrapstring or "\n") * (len(str(value)) // max(width if isinstance(width, int) else 1, 1) + 1)
    ),
    "batch": lambda value, linecount=0, fill_with=None, **kw: linecount if isinstance(linecount, int) else 0,
    "slice": lambda value, slices=0, fill_with=None, **kw: slices if isinstance(slices, int) else 0,
    "replace": lambda value, old="", new="", count=None, **kw: _replaced_size(
        str(value), old, new, -1 if count is None else count
    ),
    "join": lambda value, d="", attribute=None, **kw: _joined_size(d, value),
    "tojson": lambda value, indent=None, **kw: indent if isinstance(indent, int) else 0,
    "truncate": lambda value, length=255, killwords=False, end="...", leeway=None, **kw: len(str(end)),
}


def check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A call from a template (a str method, `lipsum`): refused when its result would be too large."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, str):
        if name in ("format", "format_map"):
            check_str_format(owner, args, kwargs if name == "format" else {})
        elif name in _STR_METHOD_SIZES:
            _check(_STR_METHOD_SIZES[name](owner, *args), f"str.{name}")
    elif obj is generate_lorem_ipsum:
        n, _, _, max_words = (list(args) + [5, True, 20, 100][len(args):])[:4]
        n, max_words = kwargs.get("n", n), kwargs.get("max", max_words)
        _check(_int_args([n]) * max(_int_args([max_words]), 1), "lipsum")


def guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` (the filter `name`) refusing arguments that would build too large a result."""
    if name == "format":
        def format_filter(value: Any, *args: Any, **kwargs: Any) -> Any:
            check_percent(value, kwargs or args)
            return func(value, *args, **kwargs)
        return _like(func, format_filter)
    size = _FILTER_SIZES.get(name)
    if size is None:
        return func
    takes_context = getattr(func, "jinja_pass_arg", None) is not None

    def guarded(*args: Any, **kwargs: Any) -> Any:
        value_args = args[1:] if takes_context else args
        if name == "join" and value_args and not hasattr(value_args[0], "__len__"):
            items = list(value_args[0])  # a generator: its length decides the size
            args = (*args[: len(args) - len(value_args)], items, *value_args[1:])
            value_args = value_args[:0] + (items,) + value_args[1:]
        _check(size(*value_args, **kwargs), f"the {name} filter")
        return func(*args, **kwargs)

    return _like(func, guarded)


def _like(func: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """`wrapper` with `func`'s Jinja marks (pass_context, pass_environment, ...)."""
    for attr in ("jinja_pass_arg",):
        if hasattr(func, attr):
            setattr(wrapper, attr, getattr(func, attr))
    wrapper.__name__ = getattr(func, "__name__", "filter")
    return wrapper


class LoopBudget:
    """Items taken by every `for` loop of one render; reset before each render."""

    def __init__(self) -> None:
        self.steps = 0

    def reset(self) -> None:
        self.steps = 0

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.steps += 1
            if self.steps > MAX_LOOP_STEPS:
                raise SecurityError(f"the template's loops ran more than {MAX_LOOP_STEPS} times for one row")
            yield item
