"""What every command of the `batchllm` app shares: how a user error ends it (one line on stderr, its
exit code) and how the prompt flags (--var, --param, --system, --truncate-column) are read."""
from __future__ import annotations

import typer

from batchllm_cli.errors import BatchLLMError
from batchllm_cli.progress import print_error
from batchllm_cli.prompt_options import PromptOptions, parse_assignments, read_system, system_file_of


def fail(exc: BatchLLMError) -> typer.Exit:
    print_error(str(exc))
    return typer.Exit(exc.exit_code)


def prompt_options_of(
    var: list[str] | None, param: list[str] | None, system: str | None, truncate_column: list[str] | None
) -> PromptOptions:
    """--var, --param, --system and --truncate-column as run, analyze and render all read them."""
    try:
        return PromptOptions(
            variables=parse_assignments(var, "--var", "COLUMN"),
            params=parse_assignments(param, "--param"),
            system=read_system(system),
            system_file=system_file_of(system),
            truncate_columns=tuple(dict.fromkeys(truncate_column or ())),
        )
    except BatchLLMError as exc:
        raise fail(exc) from None
