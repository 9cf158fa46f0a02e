"""Out-of-core lexicographic sort of token sequences with DuckDB, for `analyze`'s out-of-core plan.

DuckDB orders LIST<INTEGER> lexicographically with a list before its extensions, and its sort
spills to `temp_directory` when the data exceed `memory_limit`, so prompt sets larger than memory
can be planned. Rows go in as Arrow list arrays built zero-copy from the packed arrays, and come back
as Arrow batches converted to PackedSequences. Ties (identical sequences) are ordered by row index,
the same order as the engine's in-memory sort (engine/planning/sort.py), so both paths give
identical plans: the sorted batches go to `engine.plan_prefixes_from_sorted_stream`.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from engine import PackedSequences


def _to_arrow(rows: np.ndarray, batch: PackedSequences) -> pa.Table:
    toks = pa.LargeListArray.from_arrays(pa.array(batch.offsets), pa.array(batch.tokens))
    return pa.table({"row": pa.array(rows), "toks": toks})


def _from_arrow(record: pa.RecordBatch) -> tuple[np.ndarray, PackedSequences]:
    rows = record.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    lists = record.column(1)
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    # A list array may be a slice of a larger values buffer: rebase the offsets to zero.
    values = np.asarray(lists.values, dtype=np.int32)[offsets[0] : offsets[-1]]
    return rows, PackedSequences(np.ascontiguousarray(values), offsets - offsets[0])


def sort_sequences_out_of_core(
    batches: Iterable[PackedSequences],
    *,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
    threads: int | None = None,
    batch_rows: int = 65536,
) -> Iterator[tuple[np.ndarray, PackedSequences]]:
    """Sort all sequences of `batches` (rows numbered 0.. in the order given).

    Consumes `batches` before returning (so work done while iterating them, such as feeding a
    simulation, is complete when this returns); the returned iterator streams
    (row indices, sequences) batches of up to `batch_rows` rows in sorted order.
    memory_limit: DuckDB memory limit, e.g. "4GB"; temp_directory: where the sort may spill.
    """
    con = duckdb.connect(":memory:")
    if memory_limit is not None:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if temp_directory is not None:
        con.execute("SET temp_directory = ?", [temp_directory])
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    # Insertion order is irrelevant to the result (ORDER BY below), so let DuckDB skip keeping it.
    con.execute("SET preserve_insertion_order = false")
    con.execute("CREATE TABLE seqs (row BIGINT, toks INTEGER[])")
    start = 0
    for batch in batches:
        if batch.n == 0:
            continue
        arrow_batch = _to_arrow(np.arange(start, start + batch.n, dtype=np.int64), batch)
        con.register("incoming", arrow_batch)
        con.execute("INSERT INTO seqs SELECT row, toks FROM incoming")
        con.unregister("incoming")
        start += batch.n
    reader = con.sql("SELECT row, toks FROM seqs ORDER BY toks, row").to_arrow_reader(batch_rows)

    def stream() -> Iterator[tuple[np.ndarray, PackedSequences]]:
        try:
            for record in reader:
                if record.num_rows:
                    yield _from_arrow(record)
        finally:
            con.close()

    return stream()
