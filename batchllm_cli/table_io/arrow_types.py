"""A Parquet input's own Arrow types, put back on the columns DuckDB gives.

DuckDB reads a Parquet column into its own types, which hold the same values in another
representation: a timestamp or time in microseconds whatever its unit, a duration as its count (int64),
fixed_size_binary as a blob, a dictionary as its values, a fixed-size list as a list, half floats as
floats, and every time zone tagged with DuckDB's session zone. Parquet output casts these back
(safely: a value the input's type cannot hold fails the cast, and that column keeps DuckDB's type);
rows handed to templates get their time zones back, so a time prints in its column's own zone.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Collection

import numpy as np
import pyarrow as pa

_TEXTS = (pa.string(), pa.large_string(), pa.string_view())
_BLOBS = (pa.binary(), pa.large_binary(), pa.binary_view())


class LossyCast(Exception):
    """A value of `column` does not survive the cast to the input's own type."""

    def __init__(self, column: str) -> None:
        super().__init__(column)
        self.column = column


def own_type(schema: pa.Schema | None, name: str) -> pa.DataType | None:
    """The input's own type of column `name` (None: not an input file's column, or unnamed twice)."""
    if schema is None:
        return None
    i = schema.get_field_index(name)
    return schema.field(i).type if i >= 0 else None


def storage_of(typ: pa.DataType) -> pa.DataType:
    """The type an extension type (arrow.uuid, say) stores its values as; any other type itself."""
    return typ.storage_type if isinstance(typ, pa.BaseExtensionType) else typ


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _same_kind(original: pa.DataType, read: pa.DataType) -> bool:
    """Whether `read` (DuckDB's Arrow type for a column) holds the values of `original` (the input
    file's type) in another representation, so that casting back restores the column (or fails)."""
    if original == read:
        return True
    if pa.types.is_dictionary(original):
        return _same_kind(original.value_type, read)
    if isinstance(original, pa.BaseExtensionType):
        return _same_kind(original.storage_type, read)
    if pa.types.is_timestamp(original):
        # A zone tag, never a zone added or dropped: that would move every wall-clock time.
        return pa.types.is_timestamp(read) and (original.tz is None) == (read.tz is None)
    if pa.types.is_duration(original):
        return pa.types.is_duration(read) or read == pa.int64()  # the count of the column's unit
    kinds = (pa.types.is_time, pa.types.is_date, pa.types.is_floating)
    if any(kind(original) and kind(read) for kind in kinds):
        return True
    if pa.types.is_fixed_size_binary(original):
        return read in _BLOBS or pa.types.is_fixed_size_binary(read)
    if (original in _TEXTS and read in _TEXTS) or (original in _BLOBS and read in _BLOBS):
        return True
    if _is_list(original) and _is_list(read):
        return _same_kind(original.value_type, read.value_type)
    if pa.types.is_struct(original) and pa.types.is_struct(read):
        return [f.name for f in original] == [f.name for f in read] and all(
            _same_kind(a.type, b.type) for a, b in zip(original, read)
        )
    if pa.types.is_map(original) and pa.types.is_map(read):
        return _same_kind(original.key_type, read.key_type) and _same_kind(original.item_type, read.item_type)
    return False


def _castable(read: pa.DataType, original: pa.DataType) -> bool:
    """Whether this pyarrow can cast `read` to `original` at all (older versions lack some casts)."""
    try:
        pa.nulls(1, read).cast(original)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def restorable(original: pa.DataType, read: pa.DataType) -> bool:
    """Whether a column DuckDB reads as `read` gets its own type `original` back in Parquet output."""
    return original != read and _same_kind(original, read) and _castable(read, original)


def restored_schema(got: pa.Schema, own: pa.Schema | None, lossy: Collection[str] = ()) -> pa.Schema | None:
    """`got` (DuckDB's Arrow schema of the output) with the input's own field put back for each
    column DuckDB holds in another representation, except the `lossy` ones (a value of theirs failed
    the cast); None when nothing needs putting back."""
    if own is None:
        return None
    fields = []
    for f in got:
        typ = own_type(own, f.name)
        keep = typ is not None and f.name not in lossy and restorable(typ, f.type)
        fields.append(own.field(f.name) if keep else f)
    return pa.schema(fields) if any(a is not b for a, b in zip(fields, got)) else None


def _narrows_floats(original: pa.DataType, read: pa.DataType) -> bool:
    """Whether casting `read` to `original` narrows a float anywhere in it (float to half float, say),
    which a safe cast does not check: it rounds."""
    original = storage_of(original.value_type if pa.types.is_dictionary(original) else original)
    if pa.types.is_floating(original) and pa.types.is_floating(read):
        return original.bit_width < read.bit_width
    if _is_list(original) and _is_list(read):
        return _narrows_floats(original.value_type, read.value_type)
    if pa.types.is_struct(original) and pa.types.is_struct(read):
        return any(_narrows_floats(a.type, b.type) for a, b in zip(original, read))
    if pa.types.is_map(original) and pa.types.is_map(read):
        return _narrows_floats(original.key_type, read.key_type) or _narrows_floats(original.item_type, read.item_type)
    return False


def _same_floats(a: pa.Array, b: pa.Array) -> bool:
    """Equal, NaN equal to NaN (plain float arrays only: nested NaNs count as different)."""
    if a.equals(b):
        return True
    if not pa.types.is_floating(a.type):
        return False
    return bool(np.array_equal(a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False), equal_nan=True))


def _cast_back(column: pa.Array, field: pa.Field) -> pa.Array:
    """`column` as `field`'s type, or LossyCast when a value would not survive: the safe cast refuses
    a lost unit or byte, and a narrowed float must come back equal."""
    try:
        cast = column.cast(field.type, safe=True)
    except pa.ArrowInvalid as exc:
        raise LossyCast(field.name) from exc
    if _narrows_floats(field.type, column.type) and not _same_floats(cast.cast(column.type), column):
        raise LossyCast(field.name)
    return cast


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` cast to `schema` column by column; LossyCast names a column whose values the new type
    cannot hold (a timestamp in microseconds cast to milliseconds, say)."""
    arrays = [c if c.type == f.type else _cast_back(c, f) for c, f in zip(batch.columns, schema)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@lru_cache(maxsize=None)
def known_zone(zone: str) -> bool:
    """Whether pyarrow can give a time in `zone` to Python (a zone missing from the time zone database,
    or a name no database has, cannot be a datetime's tzinfo)."""
    try:
        pa.scalar(0, pa.timestamp("us", zone)).as_py()
    except Exception:  # what a missing zone raises depends on the pyarrow version and the platform
        return False
    return True


def _relisted(typ: pa.DataType, value: pa.DataType) -> pa.DataType:
    """The list type `typ` (list, large or fixed-size) holding `value`s instead."""
    field = typ.value_field.with_type(value)
    if pa.types.is_fixed_size_list(typ):
        return pa.list_(field, typ.list_size)
    return pa.large_list(field) if pa.types.is_large_list(typ) else pa.list_(field)


def _zoned(read: pa.DataType, original: pa.DataType) -> pa.DataType:
    """`read` with each time zone in it (nested too) the one `original` gives that time, where Python
    knows it; only zone tags change, never a unit or a value."""
    original = storage_of(original.value_type if pa.types.is_dictionary(original) else original)
    if pa.types.is_timestamp(read) and pa.types.is_timestamp(original):
        zoned = read.tz is not None and original.tz is not None and known_zone(original.tz)
        return pa.timestamp(read.unit, original.tz) if zoned else read
    if _is_list(read) and _is_list(original):
        return _relisted(read, _zoned(read.value_type, original.value_type))
    if pa.types.is_struct(read) and pa.types.is_struct(original):
        if [f.name for f in read] != [f.name for f in original]:
            return read
        return pa.struct([f.with_type(_zoned(f.type, o.type)) for f, o in zip(read, original)])
    if pa.types.is_map(read) and pa.types.is_map(original):
        key = read.key_field.with_type(_zoned(read.key_type, original.key_type))
        return pa.map_(key, read.item_field.with_type(_zoned(read.item_type, original.item_type)), read.keys_sorted)
    return read


def own_zone(schema: pa.Schema | None, name: str) -> str | None:
    """The time zone the input file gives column `name` (None: no zone, or not a timestamp)."""
    typ = own_type(schema, name)
    typ = storage_of(typ) if typ is not None else None
    return typ.tz if typ is not None and pa.types.is_timestamp(typ) else None


def zoned_schema(got: pa.Schema, own: pa.Schema | None) -> pa.Schema | None:
    """`got` (DuckDB's Arrow schema of the rows) with the input's own time zones (DuckDB tags its
    session zone, UTC); None when no zone changes."""
    if own is None:
        return None
    fields = []
    for f in got:
        typ = own_type(own, f.name)
        fields.append(f if typ is None else f.with_type(_zoned(f.type, typ)))
    return pa.schema(fields) if any(a.type != b.type for a, b in zip(fields, got)) else None
