"""What every command of the `batchllm` app shares: how a user error ends it (one line on stderr, its
exit code) and how the prompt flags (--var, --param, --system, --truncate-column) are read."""
from __future__ import annotations

import typer

from batchllm_cli.errors import BatchLLMError
from batchllm_cli.progress import print_error, print_event
from batchllm_cli.prompt_options import PromptOptions, parse_assignments, read_system, system_file_of


def fail(exc: BatchLLMError, as_json: bool = False) -> typer.Exit:
    """as_json (--log-format json): the error as an `error` event, one JSON line, instead of `error: ...`."""
    if as_json:
        print_event("error", {"message": " ".join(str(exc).split()), "exit_code": exc.exit_code})
    else:
        print_error(str(exc))
    return typer.Exit(exc.exit_code)


def prompt_options_of(
    var: list[str] | None, param: list[str] | None, system: str | None, truncate_column: list[str] | None,
    as_json: bool = False,
) -> PromptOptions:
    """--var, --param, --system and --truncate-column as run, analyze and render all read them (as_json: a
    bad one ends the command with an `error` event, see `fail`)."""
    try:
        return PromptOptions(
            variables=parse_assignments(var, "--var", "COLUMN"),
            params=parse_assignments(param, "--param"),
            system=read_system(system),
            system_file=system_file_of(system),
            truncate_columns=tuple(dict.fromkeys(truncate_column or ())),
        )
    except BatchLLMError as exc:
        raise fail(exc, as_json) from None
