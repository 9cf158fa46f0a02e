"""--help as plain click text, with the options grouped under the help panels of batchllm_cli.options.

Typer's rich help draws a table that fits the terminal by cutting option names (`--gpu-memory-uti…`),
so `batchllm run --help | grep gpu-memory-utilization` found nothing on a narrow terminal or a pipe,
and it shows boolean flags as `<bool>`. Click's formatter wraps only the help text and writes flags as
`--chat / --no-chat`; this command class keeps typer's grouping by panel on top of it.
"""
from __future__ import annotations

from typing import Any

from typer.core import TyperCommand

OPTIONS_SECTION = "Options"


class SectionedHelpCommand(TyperCommand):
    """A typer command whose --help lists arguments, then options by `rich_help_panel`, in order of
    first appearance; options without a panel come under "Options"."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        # Typer vendors its own click, so the context and formatter are typed by duck typing.
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                title = "Arguments"
            else:
                title = getattr(param, "rich_help_panel", None) or OPTIONS_SECTION
            sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)
