"""The options that say how to read INPUT (--input-glob, --input-format, --encoding, --where, --columns),
shared by every command that reads a table and passed on as one InputOptions."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from batchllm_cli.table_io.inputs import FORMAT_CHOICES, InputOptions


InputFormat = Enum("InputFormat", {name: name for name in FORMAT_CHOICES}, type=str)  # type: ignore[misc]


PANEL_READING = "Reading the input"
InputGlobOpt = Annotated[
    bool,
    typer.Option(
        "--input-glob",
        help="Read INPUT as a pattern (*, ?, [...], ** for any depth), files in sorted order. Without it a "
        "path is taken literally (a file named a*.csv is read as itself).",
        rich_help_panel=PANEL_READING,
    ),
]
InputFormatOpt = Annotated[
    Optional[InputFormat],
    typer.Option(
        "--input-format",
        help="The input's format, instead of the file extension (stdin: sniffed, CSV unless it starts "
        "with '{' or '[').",
        case_sensitive=False,
        show_default=False,
        rich_help_panel=PANEL_READING,
    ),
]
EncodingOpt = Annotated[
    Optional[str],
    typer.Option(
        "--encoding",
        metavar="NAME",
        help="CSV/TSV text encoding, e.g. latin-1, utf-16, cp1252. Default: utf-8.",
        show_default=False,
        rich_help_panel=PANEL_READING,
    ),
]
WhereOpt = Annotated[
    Optional[str],
    typer.Option(
        "--where",
        metavar="SQL",
        help="Use only the rows for which this DuckDB condition is true, e.g. \"lang = 'en'\" (CSV "
        "columns are text: CAST(n AS INTEGER) > 3). Row numbers count the rows kept, from 0.",
        show_default=False,
        rich_help_panel=PANEL_READING,
    ),
]
ColumnsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--columns",
        metavar="A,B,C",
        help="Keep only these input columns, in this order (the template sees, and the output holds, only "
        "these; --where may use any column).",
        show_default=False,
        rich_help_panel=PANEL_READING,
    ),
]


def input_options(
    glob: bool, fmt: InputFormat | None, encoding: str | None, where: str | None, columns: str | None
) -> InputOptions:
    """The reading flags as the one value every table-reading command passes to TableSource."""
    picked = tuple(c.strip() for c in columns.split(",")) if columns is not None else None
    return InputOptions(glob=glob, format=fmt.value if fmt is not None else None, encoding=encoding,
                        where=where, columns=picked)
