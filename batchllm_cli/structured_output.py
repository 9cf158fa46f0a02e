"""Structured output on the table side: the --choices / --regex / --json-schema flags (or a recipe's
defaults) become one constraint; a schema's top-level properties become typed output columns; an
answer becomes typed values, or an `incomplete_structured_output` error when it is not a whole value.

The engine enforces the constraint while decoding (engine/grammar.py); this module never imports it
at load time and knows no tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from batchllm_cli.errors import UsageError
from batchllm_cli.table_io import ROW_ID, duckdb_key

if TYPE_CHECKING:
    import recipes
    from engine import StructuredOutput

INCOMPLETE = "incomplete_structured_output"
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


@dataclass(frozen=True)
class ConstraintFlags:
    """The flags as given on the command line (None: not given)."""

    choices: str | None = None
    regex: str | None = None
    json_schema: Path | None = None


@dataclass(frozen=True)
class Constraint:
    kind: str  # "choices" | "regex" | "json_schema"
    value: str  # the engine's form: the labels as a JSON array, the pattern, or the schema text
    labels: tuple[str, ...] = ()
    schema: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def fingerprint(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}

    def to_engine(self) -> StructuredOutput:
        from engine import StructuredOutput

        return StructuredOutput(self.kind, self.value)  # type: ignore[arg-type]


def _read_choices(arg: str) -> tuple[str, ...]:
    if arg.startswith("@"):
        path = Path(arg[1:])
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--choices {arg}: cannot read {path}: {exc}") from exc
        labels = [line.strip() for line in lines]
    else:
        labels = [part.strip() for part in arg.split(",")]
    labels = list(dict.fromkeys(label for label in labels if label))
    if not labels:
        raise UsageError(f"--choices {arg!r} names no label; give A,B,C or @FILE with one label per line.")
    return tuple(labels)


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UsageError(f"--json-schema: cannot read {path}: {exc}") from exc
    except ValueError as exc:  # bad JSON or UTF-8, or an integer past Python's digit limit
        raise UsageError(f"--json-schema {path} is not valid JSON: {exc}.") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema {path} must hold a JSON object (a JSON Schema), not {type(schema).__name__}.")
    return schema


def schema_constraint(schema: dict[str, Any]) -> Constraint:
    # key order kept: the grammar writes properties in the order the schema declares them
    return Constraint("json_schema", json.dumps(schema, ensure_ascii=False), schema=schema)


def choices_constraint(labels: Sequence[str]) -> Constraint:
    return Constraint("choices", json.dumps(list(labels), ensure_ascii=False), labels=tuple(labels))


def resolve_constraint(
    flags: ConstraintFlags, recipe: recipes.Recipe | None = None, input_columns: Iterable[str] = ()
) -> Constraint | None:
    """The job's constraint: the flag given (at most one), else the recipe's default. A recipe's
    default is left out when the input has one of the recipe's optional columns (per-row labels or
    fields ask for answers the default would forbid)."""
    given = [name for name, v in (("--choices", flags.choices), ("--regex", flags.regex),
                                  ("--json-schema", flags.json_schema)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be used together; pick one constraint.")
    if flags.choices is not None:
        return choices_constraint(_read_choices(flags.choices))
    if flags.regex is not None:
        if not flags.regex:
            raise UsageError("--regex must not be empty.")
        return Constraint("regex", flags.regex)
    if flags.json_schema is not None:
        return schema_constraint(_read_schema(flags.json_schema))
    if recipe is None or set(recipe.optional_columns) & set(input_columns):
        return None
    if recipe.choices:
        return choices_constraint(recipe.choices)
    if recipe.json_schema:
        return schema_constraint(dict(recipe.json_schema))
    return None


# -- typed columns ----------------------------------------------------------------------------------
def _resolve(schema: Any, root: dict[str, Any], seen: frozenset[str]) -> tuple[Any, frozenset[str]]:
    """`schema` with a local `$ref` (`#/$defs/Name`, as pydantic writes enums and nested models)
    followed, and an `anyOf`/`oneOf` of one schema plus `{"type": "null"}` (pydantic's Optional) read as
    that schema; anything else as it is. A `$ref` that is not local, not found, or already in `seen` (the
    refs followed on the way here: a recursive model has no Arrow type) is None. Returns the schema and
    `seen` with the refs followed."""
    while isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#") or ref in seen:
                return None, seen
            seen = seen | {ref}
            target: Any = root
            for part in ref[1:].split("/")[1:]:
                key = part.replace("~1", "/").replace("~0", "~")
                target = target.get(key) if isinstance(target, dict) else None
            schema = target
            continue
        options = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(options, list):
            kept = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            if len(kept) != 1:
                return schema, seen
            schema = kept[0]
            continue
        return schema, seen
    return schema, seen


def _arrow_type(schema: Any, root: dict[str, Any], seen: frozenset[str] = frozenset()) -> pa.DataType | None:
    """The Arrow type of a property's values; None when it has no single type (kept as JSON text).
    `root`: the whole schema, where local `$ref`s point."""
    schema, seen = _resolve(schema, root, seen)
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: nullable string
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in schema:
        values = schema["enum"]
        if values and all(isinstance(v, str) for v in values):
            kind = "string"
    if kind is None and "const" in schema and isinstance(schema["const"], str):
        kind = "string"
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        item = _arrow_type(schema.get("items"), root, seen)
        return pa.list_(item) if item is not None else None
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return None
        fields = [(name, _arrow_type(sub, root, seen)) for name, sub in props.items()]
        if any(t is None for _, t in fields):
            return None
        return pa.struct([pa.field(name, t) for name, t in fields])  # type: ignore[arg-type]
    return None


@dataclass(frozen=True)
class TypedField:
    name: str  # the property name
    type: pa.DataType  # pa.string() holding JSON text when the property has no single type
    json_text: bool = False


def typed_fields(constraint: Constraint | None) -> list[TypedField]:
    """One typed output column per top-level property of an object schema (none otherwise)."""
    if constraint is None or constraint.kind != "json_schema":
        return []
    props = constraint.schema.get("properties")
    if constraint.schema.get("type", "object") != "object" or not isinstance(props, dict):
        return []
    out = []
    for name, sub in props.items():
        t = _arrow_type(sub, constraint.schema)
        out.append(TypedField(name, t, False) if t is not None else TypedField(name, pa.string(), True))
    return out


def typed_column_names(
    column_prefix: str, fields: list[TypedField], output_columns: Sequence[str], input_columns: Sequence[str]
) -> list[str]:
    """The typed columns' names, `{column}_{property}`; refused when one equals (ignoring case) another
    output column, an input column, or another property's column."""
    taken = {duckdb_key(c): f"output column {c}" for c in output_columns}
    taken.update({duckdb_key(c): f"input column {c}" for c in input_columns})
    taken[duckdb_key(ROW_ID)] = f"internal column {ROW_ID}"
    names = []
    for f in fields:
        name = f"{column_prefix}_{f.name}"
        if "\x00" in name:  # DuckDB ends a name at a NUL byte: the column would come back renamed
            raise UsageError(f"The JSON schema's property {f.name!r} holds a NUL character, which a column name "
                             "cannot keep; rename the property.")
        if duckdb_key(name) in taken:
            raise UsageError(
                f"The JSON schema's property {f.name!r} would become column {name!r}, which clashes with the "
                f"{taken[duckdb_key(name)]}; rename the property, or give `run` another --column."
            )
        taken[duckdb_key(name)] = f"column of property {f.name!r}"
        names.append(name)
    return names


def checked_typed_fields(
    constraint: Constraint | None, column_prefix: str, output_columns: Sequence[str], input_columns: Sequence[str]
) -> list[TypedField]:
    """The constraint's typed fields, their column names checked (typed_column_names): the one check run and
    analyze both make, so analyze refuses a schema run would refuse."""
    fields = typed_fields(constraint)
    typed_column_names(column_prefix, fields, output_columns, input_columns)
    return fields


def answer_error(constraint: Constraint, text: str, finish_reason: str, stop_string: str | None = None) -> str | None:
    """Why an answer is not a whole value (None when it is). The grammar guarantees validity of
    every finished answer; what it cannot prevent is an answer cut by the token limit or by a stop
    string (`stop_string`, the one that ended it), so that is what is checked here."""
    if finish_reason == "length":
        return (
            "The answer was cut by --max-tokens before its structured value was complete; raise --max-tokens."
        )
    if stop_string is not None:
        # Everything the model writes before end-of-sequence is the value, so a stop string found in it
        # always cuts it: even a text that is itself a whole value (`no` of `nope`) is not the answer.
        return (f"The --stop string {stop_string!r} cut the answer inside its structured value (the model went on "
                f"after {text[:60]!r}); drop that --stop string.")
    if constraint.kind == "choices" and text not in constraint.labels:
        return f"The answer {text[:60]!r} is not one of the choices."
    if constraint.kind != "choices" and "\ufffd" in text:
        from engine import answer_matches

        if not answer_matches(constraint.to_engine(), text):
            return (f"The answer {text[:60]!r} is not a whole value of the constraint: the model wrote bytes that "
                    "are not valid UTF-8.")
    if constraint.kind == "json_schema":
        try:
            value = json.loads(text)  # strict, as the grammar: no raw control characters in strings
        except ValueError:
            return "The answer is not complete JSON."
        big = _integer_beyond_int64(value)
        if big is not None:  # its typed column is a 64-bit integer (BIGINT): it cannot hold the value
            return (f"The answer holds the integer {str(big)[:40]}, beyond the 64-bit range of its typed column; "
                    "bound it with minimum/maximum in the JSON schema.")
    return None


def _integer_beyond_int64(value: Any) -> int | None:
    """The first integer in a parsed JSON value outside [-2**63, 2**63), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if not -(2**63) <= value < 2**63 else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _integer_beyond_int64(item)
        if found is not None:
            return found
    return None


def _convert(value: Any, t: pa.DataType, json_text: bool) -> Any:
    if json_text or (pa.types.is_string(t) and not isinstance(value, str) and value is not None):
        return None if value is None else json.dumps(value, ensure_ascii=False)
    return value


def typed_columns(texts: Sequence[str | None], fields: list[TypedField], nested_as_json: bool) -> list[pa.Array]:
    """One array per field from the answers' JSON text (None for error rows and absent properties).
    nested_as_json: lists and structs become JSON text (for CSV output)."""
    parsed = []
    for text in texts:
        obj = None
        if text is not None:
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
        parsed.append(obj if isinstance(obj, dict) else {})
    arrays = []
    for f in fields:
        nested = pa.types.is_list(f.type) or pa.types.is_struct(f.type)
        as_json = f.json_text or (nested and nested_as_json)
        t = pa.string() if as_json else f.type
        values = [_convert(obj.get(f.name), t, as_json) for obj in parsed]
        arrays.append(pa.array(values, type=t))
    return arrays


def check_constraint_compiles(
    constraint: Constraint, model_dir: Path, tokenizer: Any, vocab_size: int | None = None
) -> None:
    """Compile the grammar for this model now (before its weights load); the engine reuses it.
    `vocab_size`: the model's, from its config.json when not given."""
    from engine import EngineError, compile_constraint, load_model_config

    try:
        if vocab_size is None:
            vocab_size = load_model_config(model_dir).vocab_size
        compile_constraint(constraint.to_engine(), model_dir, vocab_size, tokenizer.eos_token_ids)
    except EngineError as exc:
        raise UsageError(str(exc)) from exc


def with_typed_columns(
    results: pa.Table, fields: list[TypedField], output_names: list[str], nested_as_json: bool
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """`results` (shard schema) plus one column per typed field, parsed from the answers of rows
    without an error; and the (result column, output column) pairs that pick them."""
    ok = pa.compute.is_null(results.column("error"))
    texts = pa.compute.if_else(ok, results.column("text"), pa.scalar(None, pa.string())).to_pylist()
    pairs = []
    for i, (f, array) in enumerate(zip(fields, typed_columns(texts, fields, nested_as_json), strict=True)):
        internal = f"structured_{i}"
        results = results.append_column(internal, array)
        pairs.append((internal, output_names[i]))
    return results, pairs
