"""Ready prompt templates for common batch jobs, with their defaults.

Each recipe is a Jinja2 template `NAME.j2` and a JSON sidecar `NAME.json` holding its one-line
description, the columns it reads (required, and optional ones that have a default in the template)
and its default max tokens, and optionally the structured output it asks for by default (`choices`
or a `json_schema`). Templates put static instructions first and row fields last, so every row
shares the longest possible prompt prefix (which the engine computes once).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

__all__ = ["Recipe", "list_recipes", "load_recipe", "recipe_names"]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    text: str
    required_columns: dict[str, str]  # column -> what it should hold
    optional_columns: dict[str, str]  # column -> what it holds and the default used when absent
    max_tokens: int
    choices: tuple[str, ...] = ()  # default --choices (structured output)
    json_schema: dict | None = None  # default --json-schema

    def __hash__(self) -> int:  # dict fields are not hashable; the name identifies a recipe
        return hash(self.name)


def recipe_names() -> list[str]:
    files = resources.files(__name__)
    return sorted(p.name[: -len(".j2")] for p in files.iterdir() if p.name.endswith(".j2"))


def load_recipe(name: str) -> Recipe:
    """The recipe called `name` (a trailing `.j2` is accepted); LookupError if there is none."""
    if name.endswith(".j2"):
        name = name[: -len(".j2")]
    if name not in recipe_names():
        raise LookupError(name)
    files = resources.files(__name__)
    text = (files / f"{name}.j2").read_text(encoding="utf-8")
    meta_file = files / f"{name}.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return Recipe(
        name=name,
        description=str(meta.get("description", "")),
        text=text,
        required_columns=dict(meta.get("required_columns", {})),
        optional_columns=dict(meta.get("optional_columns", {})),
        max_tokens=int(meta.get("max_tokens", 256)),
        choices=tuple(str(c) for c in meta.get("choices", ())),
        json_schema=meta.get("json_schema"),
    )


def list_recipes() -> list[Recipe]:
    return [load_recipe(name) for name in recipe_names()]
