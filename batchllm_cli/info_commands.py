"""The `status` and `recipes` commands: a run's progress as its marker and checkpoint tell it, and the
bundled prompt recipes."""
from __future__ import annotations

import json
import sys
from typing import Any

import typer

import recipes
from batchllm_cli.command_common import fail
from batchllm_cli.errors import BatchLLMError, UsageError
from batchllm_cli.options import RecipeNameArg, StatusJsonOpt, StatusTargetArg
from batchllm_cli.std_streams import stdout_data


def status_command(target: StatusTargetArg, as_json: StatusJsonOpt = False) -> None:
    """Show how far a run is: rows done of total, rows in error, speed and ETA, state.

    Reads the output's completion marker and checkpoint only (safe while the run is working). The exit
    code says the state, for scripts and sensors.
    """
    from batchllm_cli.status import format_status, read_status, status_json

    try:
        st = read_status(target)
    except BatchLLMError as exc:
        if as_json:  # a sensor parsing stdout gets JSON whatever happened
            with stdout_data():
                sys.stdout.write(json.dumps({"state": "error", "exit_code": exc.exit_code, "error": str(exc)}) + "\n")
                sys.stdout.flush()
        raise fail(exc) from None
    with stdout_data():  # `status OUT | head -1`: the exit code is still the state
        if as_json:
            sys.stdout.write(status_json(st))
            sys.stdout.flush()
        else:
            typer.echo(format_status(st))
    raise typer.Exit(st.exit_code)


def recipes_command(name: RecipeNameArg = None) -> None:
    """List the bundled prompt recipes (use a name as --template), or print one: recipes NAME."""
    if name is not None:
        try:
            recipe = recipes.load_recipe(name)
        except LookupError:
            raise fail(UsageError(
                f"No recipe {name!r}; recipes: {', '.join(recipes.recipe_names())}."
            )) from None
        with stdout_data():
            typer.echo(_describe_recipe(recipe))
        return
    rows: list[dict[str, Any]] = []
    for recipe in recipes.list_recipes():
        optional = ", ".join(f"[{name}]" for name in recipe.optional_columns)
        needs = ", ".join(list(recipe.required_columns) + ([optional] if optional else []))
        rows.append({"name": recipe.name, "description": recipe.description, "columns": needs})
    width = max((len(r["name"]) for r in rows), default=0)
    with stdout_data():
        for r in rows:
            # Plain stdout lines: this list is the command's output and should pipe cleanly.
            typer.echo(f"{r['name']:<{width}}  {r['description']} Columns: {r['columns']}.")


def _describe_recipe(recipe: recipes.Recipe) -> str:
    lines = [f"{recipe.name}: {recipe.description}", "variables:"]
    lines += [f"  {var}: {what} (required)" for var, what in recipe.required_columns.items()]
    lines += [f"  {var}: {what} (optional)" for var, what in recipe.optional_columns.items()]
    lines.append("  (a column of that name, or --var NAME=COLUMN for another column, or -p NAME=VALUE for a constant)")
    lines.append(f"max tokens: {recipe.max_tokens} (default of --max-tokens)")
    if recipe.choices:
        lines.append(f"choices: {', '.join(recipe.choices)} (default of --choices)")
    if recipe.json_schema is not None:
        lines.append(f"json schema (default of --json-schema): {json.dumps(recipe.json_schema, ensure_ascii=False)}")
    lines += ["template:", recipe.text.rstrip("\n")]
    return "\n".join(lines)
