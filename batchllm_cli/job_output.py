"""The end of a `run` job: the output table, the errors and rejects files and the completion marker
(written last), and the report of a job that had already finished."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from batchllm_cli import __version__
from batchllm_cli.checkpoint import Committed, RunDir
from batchllm_cli.collector import SHARD_SCHEMA, OutputColumns
from batchllm_cli.durable import crash_point, remove_durably
from batchllm_cli.errors import EXIT_OK, InputChanged, UsageError
from batchllm_cli.fingerprint import digest_of, input_change
from batchllm_cli.job_types import JobCounts, PreparedRun, RunReport, engine_summary, finished_state
from batchllm_cli.marker import hash_output, write_marker
from batchllm_cli.output_files import errors_path, forget_run_dir, marker_path, rejects_path
from batchllm_cli.structured_output import typed_column_names, with_typed_columns
from batchllm_cli.table_io import ROW_ID, TableSource, output_format, write_output, write_query_jsonl, write_table_jsonl

# Rows per shard when a finished output is turned back into a checkpoint (--retry-errors).
_SEED_SHARD_ROWS = 65536

def rejected_rows(source: TableSource) -> int:
    return source.rejects.num_rows if source.rejects is not None else 0


def check_input_unchanged(prepared: PreparedRun) -> None:
    """InputChanged (exit 4) when the input is no longer the snapshot the job fingerprinted: answers are
    joined to input rows by position, so they must never be joined to a different input."""
    what = input_change(prepared.source.snapshot_files(relist=True), prepared.fingerprint)
    if what is None:
        return
    assert prepared.run_dir is not None
    raise InputChanged(
        f"The input {prepared.source.path} changed while the job ran ({what}); no output was written and the "
        f"{prepared.committed.rows} finished rows stay in the checkpoint {prepared.run_dir.path}. Put the "
        "original input back and run the same command to write the output, or add --restart to start over "
        "on the new input."
    )


def write_final(prepared: PreparedRun, model_info: dict[str, Any],
                committing: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Output, errors file, rejects file, then the completion marker; then the run dir goes. The input is
    checked against its snapshot before anything is written and again before the output is renamed
    into place. The marker also keeps what a later re-run's summary reports (chat, model, tokens).
    `committing` is called once the output is complete and checked, just before it is renamed into
    place: from there on the job is finished, whatever signal arrives."""
    check_input_unchanged(prepared)
    settings = prepared.settings
    run_dir = prepared.run_dir
    assert run_dir is not None
    committed = prepared.committed
    output = settings.output
    shards = run_dir.shard_files(committed)
    import pyarrow as pa  # only needed here: a finished job's report never loads it

    results: pa.Table | list[Path] = shards if shards else SHARD_SCHEMA.empty_table()
    source = prepared.source

    err_file = errors_path(output)
    if committed.errors:
        id_col = settings.id_column

        def errors_query(src: str, res: str) -> str:
            rid = f'"{ROW_ID}"'
            idsel = f', src."{id_col.replace(chr(34), chr(34) * 2)}" AS id' if id_col else ""
            return (
                f"SELECT res.{rid} AS row{idsel}, res.error_type, res.error FROM {res} AS res "
                f"LEFT JOIN {src} AS src ON src.{rid} = res.{rid} WHERE res.error IS NOT NULL ORDER BY res.{rid}"
            )

        write_query_jsonl(errors_query, source, results, err_file)
    else:
        remove_durably([err_file])
    rej_file = rejects_path(output)
    rejected = rejected_rows(source)
    if rejected:
        assert source.rejects is not None
        write_table_jsonl(source.rejects, rej_file)
    else:
        remove_durably([rej_file])

    columns = prepared.columns.from_shards()
    if prepared.typed_fields:
        results, typed = _typed_results(prepared, results)
        columns += typed
    write_output(
        source,
        results,
        output,
        columns=columns,
        after_write=lambda: (check_input_unchanged(prepared), crash_point("final_write"), committing()),
        after_rename=lambda: crash_point("final_rename"),
    )
    digest, identity = hash_output(output)
    marker = {
        "status": "finished",
        "finished_at": time.time(),
        "batchllm_version": __version__,
        "output": str(output),
        "output_bytes": identity[0],
        "output_sha256": digest,
        "rows": committed.rows,
        "rows_ok": committed.rows - committed.errors,
        "rows_failed": committed.errors,
        "rows_rejected": rejected,
        "errors_file": str(err_file) if committed.errors else None,
        "rejects_file": str(rej_file) if rejected else None,
        "fingerprint_sha256": digest_of(prepared.fingerprint),
        "fingerprint": prepared.fingerprint,
        "chat": prepared.chat,
        "model": model_info,
        "prompt_tokens": sum(s.prompt_tokens for s in committed.shards),
        "completion_tokens": sum(s.completion_tokens for s in committed.shards),
        "column": settings.column,  # the output's shape: a re-run with another --column rewrites it
    }
    write_marker(output, marker)
    if not settings.keep_checkpoints:
        forget_run_dir(output)  # OUT.checkpoint.json first: it never names a directory that is gone
        run_dir.remove()  # still holding its lock; PreparedRun.close() releases it
        run_dir.unlock()
    return {
        "errors_file": marker["errors_file"],
        "rejects_file": marker["rejects_file"],
        "marker": str(marker_path(output)),
        "job_finished_at": marker["finished_at"],
    }


def read_error_types(output: Path, rows_failed: int, why: str) -> dict[int, str]:
    """row -> error type of a finished job's rows in error, from its errors file: the output has no
    error type column, and rewriting the output (another --column) must keep them. UsageError (made
    before anything is written) when the file is gone or does not list `rows_failed` rows."""
    if not rows_failed:
        return {}
    path = errors_path(output)
    types: dict[int, str] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line) if line.strip() else None
            row, kind = (entry.get("row"), entry.get("error_type")) if isinstance(entry, dict) else (None, None)
            if isinstance(row, int) and isinstance(kind, str):
                types[row] = kind
    except (OSError, UnicodeDecodeError, ValueError):
        types = {}
    if len(types) != rows_failed:
        raise UsageError(
            f"{why}: {path} does not list the {rows_failed} rows in error of {output}, so it cannot be rewritten; "
            "run with the --column it was written with, or add --restart to run every row again."
        )
    return types


def check_output_for_reuse(output: Path, columns: OutputColumns, total_rows: int, why: str,
                           error_types: dict[int, str] | None = None) -> None:
    """UsageError unless the finished output can give back its answers (made before anything is written):
    it has the `columns`, one row per input row and, when `error_types` is given, a type for each row
    in error. `why` names the flag that asks for it."""
    with TableSource(output) as src:
        missing = [name for _, name in columns.from_shards() if name not in src.column_names]
        if missing:
            raise UsageError(
                f"{why}: {output} has no column {missing[0]!r}; give the --column of the run that "
                "wrote it, or use --restart to run every row again."
            )
        if src.count_rows() != total_rows:
            raise UsageError(
                f"{why}: {output} has {src.count_rows()} rows but the input has {total_rows}; use "
                "--restart to run every row again."
            )
        if error_types is not None and _error_rows(src, columns) != set(error_types):
            raise UsageError(
                f"{why}: {errors_path(output)} does not list the rows in error of {output}, so it cannot be "
                "rewritten; run with the --column it was written with, or add --restart to run every row again."
            )


def _error_rows(src: TableSource, columns: OutputColumns) -> set[int]:
    import pyarrow.compute as pc

    rows: set[int] = set()
    for batch in src.batches(_SEED_SHARD_ROWS):
        failed = batch.filter(pc.is_valid(batch.column(columns.error)))
        rows.update(failed.column(ROW_ID).to_pylist())
    return rows


def seed_from_output(output: Path, columns: OutputColumns, run_dir: RunDir, committed: Committed,
                     error_types: dict[int, str] | None = None) -> int:
    """Commit the rows of a finished output as shards, so that a run can write the job's output again
    without the run directory that was removed: the answered rows only (--retry-errors runs the rest),
    or every row when `error_types` gives the type of each row in error (the output rewritten under
    another --column). `columns` are the names the output has. The output holds the input's rows in
    order, so its ordinal is the row id. Returns the rows kept."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pairs = columns.from_shards()  # (shard column, output column)
    kept = 0
    with TableSource(output) as src:
        for batch in src.batches(_SEED_SHARD_ROWS):
            rows = batch if error_types is not None else batch.filter(pc.is_null(batch.column(columns.error)))
            if not rows.num_rows:
                continue
            cols = {ROW_ID: rows.column(ROW_ID)}
            cols.update({shard_col: rows.column(out_col) for shard_col, out_col in pairs})
            if error_types is not None:
                cols["error_type"] = pa.array([error_types.get(r) for r in rows.column(ROW_ID).to_pylist()],
                                              pa.string())
            arrays = [
                cols[f.name].cast(f.type) if f.name in cols else pa.nulls(rows.num_rows, f.type)
                for f in SHARD_SCHEMA
            ]
            table = pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)
            info = run_dir.commit_shard(table, committed.next_seq)
            committed.next_seq += 1
            committed.shards.append(info)
            committed.done[table.column(ROW_ID).to_numpy()] = True
            kept += table.num_rows
    return kept


def _typed_results(prepared: PreparedRun, results: Any) -> tuple[Any, list[tuple[str, str]]]:
    """The results as one Arrow table with the schema's typed columns added (lists and structs as
    JSON text in CSV, which has no nested types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in results]) if isinstance(results, list) else results
    names = typed_column_names(
        prepared.settings.column, prepared.typed_fields, prepared.columns.names, prepared.source.column_names
    )
    nested_as_json = output_format(prepared.settings.output) == "csv"
    return with_typed_columns(table, prepared.typed_fields, names, nested_as_json)


def already_done_report(prepared: PreparedRun, started_at: float) -> RunReport:
    """The report of a re-run of a finished job: nothing done now, the job's counts from its marker."""
    m = prepared.done_marker
    assert m is not None
    identity = prepared.report_identity()
    if m.chat is not None:  # older markers lack it: then the flag as given
        identity["chat"] = m.chat
    state = finished_state(m.rows_failed, m.rows_rejected)
    return RunReport(
        state=state,
        exit_code=EXIT_OK,  # nothing to do is success, whatever the job's rows
        started_at=started_at,
        finished_at=time.time(),
        **identity,
        job=JobCounts(
            rows_total=m.rows, rows=m.rows, rows_ok=m.rows_ok, rows_failed=m.rows_failed,
            rows_rejected=m.rows_rejected, rows_resumed=m.rows, prompt_tokens=m.prompt_tokens or 0,
            completion_tokens=m.completion_tokens or 0,
        ),
        job_finished_at=m.finished_at,
        model=dict(m.model or {}),
        engine=engine_summary(None, prepared.params.max_tokens),
        already_done=True,
        errors_file=m.errors_file,
        rejects_file=m.rejects_file,
        marker=str(marker_path(prepared.settings.output)),
    )
