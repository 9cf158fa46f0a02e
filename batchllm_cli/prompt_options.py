"""The prompt flags shared by `run`, `analyze` and `render`: --var, -p/--param, --system and
--truncate-column, parsed once into PromptOptions so the three commands cannot read them differently."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from batchllm_cli.errors import UsageError
from batchllm_cli.templates import PromptTemplate, resolve_template


@dataclass(frozen=True)
class PromptOptions:
    """How rows become prompts beyond the template itself.

    `variables` maps template variables to input columns (--var NAME=COLUMN), `params` sets template
    variables to constant text (-p NAME=VALUE), `system` is the text of a system turn for the chat
    template (--system, already read from @FILE), `system_file` is that FILE (a file the command reads,
    which nothing it writes may overwrite), `truncate_columns` are the columns cut (by tokens, from
    their end) until a too-long prompt fits (--truncate-column).
    """

    variables: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    system_file: Path | None = None
    truncate_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [name for name, _ in self.variables] + [name for name, _ in self.params]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(
                f"Template variable {', '.join(twice)} is set more than once by --var/--param; set it once."
            )

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change a row's prompt, only those set (an older checkpoint without them
        still matches a run without the flags)."""
        fp: dict[str, Any] = {}
        if self.variables:
            fp["template.variables"] = dict(self.variables)
        if self.params:
            fp["template.params"] = dict(self.params)
        if self.system is not None:
            fp["system"] = self.system
        if self.truncate_columns:
            fp["truncate_columns"] = list(self.truncate_columns)
        return fp


def parse_assignments(values: Sequence[str] | None, flag: str, value: str = "VALUE") -> tuple[tuple[str, str], ...]:
    """`NAME=VALUE` strings as (name, value) pairs; UsageError naming the flag for anything else."""
    pairs: list[tuple[str, str]] = []
    for item in values or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(
                f"{flag} {item!r}: expected NAME={value} with NAME a template variable name (letters, digits, _)."
            )
        pairs.append((name, value))
    return tuple(pairs)


def system_file_of(arg: str | None) -> Path | None:
    """The FILE of --system @FILE; None for --system TEXT or no --system."""
    return Path(arg[1:]) if arg is not None and arg.startswith("@") else None


def read_system(arg: str | None) -> str | None:
    """--system TEXT, or @FILE for the text of a file."""
    if arg is None or not arg.startswith("@"):
        return arg
    path = Path(arg[1:])
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--system {arg}: cannot read {path}: {exc}") from exc


def load_template(template: str, nulls: str, options: PromptOptions) -> PromptTemplate:
    """--template (a file or a recipe) compiled with --nulls, --var and --param."""
    return PromptTemplate(resolve_template(template), nulls=nulls, variables=dict(options.variables),
                          params=dict(options.params))


def check_prompt_columns(template: PromptTemplate, options: PromptOptions, columns: Sequence[str]) -> None:
    """Before any model: the template's variables, --var columns and --truncate-column against the
    input's columns; every --truncate-column must be one the template reads (cutting any other would
    change nothing)."""
    template.check_columns(columns)
    read = template.columns_read(columns)
    for name in options.truncate_columns:
        if name not in columns:
            raise UsageError(
                f"--truncate-column {name}: not a column of the input; available columns: {', '.join(columns)}."
            )
        if name not in read:
            raise UsageError(f"--truncate-column {name}: the template does not use this column, so cutting it "
                             "cannot shorten a prompt.")
