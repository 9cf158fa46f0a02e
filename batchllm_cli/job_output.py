"""The end of a `run` job: the output table, the errors and rejects files and the completion marker
(written last), and the report of a job that had already finished."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from batchllm_cli import __version__
from batchllm_cli.checkpoint import errors_path, marker_path, rejects_path, write_marker
from batchllm_cli.collector import SHARD_SCHEMA
from batchllm_cli.durable import crash_point, remove_durably
from batchllm_cli.fingerprint import digest_of
from batchllm_cli.job_types import PreparedRun, RunReport
from batchllm_cli.structured_output import check_column_names, with_typed_columns
from batchllm_cli.table_io import ROW_ID, TableSource, output_format, write_output, write_query_jsonl, write_table_jsonl

def rejected_rows(source: TableSource) -> int:
    return source.rejects.num_rows if source.rejects is not None else 0


def write_final(prepared: PreparedRun) -> dict[str, Any]:
    """Output, errors file, rejects file, then the completion marker; then the run dir goes."""
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
        after_write=lambda: crash_point("final_write"),
        after_rename=lambda: crash_point("final_rename"),
    )
    size = output.stat().st_size
    h = hashlib.sha256()
    with output.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    marker = {
        "status": "finished",
        "finished_at": time.time(),
        "batchllm_version": __version__,
        "output": str(output),
        "output_bytes": size,
        "output_sha256": h.hexdigest(),
        "rows": committed.rows,
        "rows_ok": committed.rows - committed.errors,
        "rows_failed": committed.errors,
        "rows_rejected": rejected,
        "errors_file": str(err_file) if committed.errors else None,
        "rejects_file": str(rej_file) if rejected else None,
        "fingerprint_sha256": digest_of(prepared.fingerprint),
        "fingerprint": prepared.fingerprint,
    }
    write_marker(output, marker)
    if not settings.keep_checkpoints:
        run_dir.remove()  # still holding its lock; PreparedRun.close() releases it
        run_dir.unlock()
    return {
        "errors_file": marker["errors_file"],
        "rejects_file": marker["rejects_file"],
        "marker": str(marker_path(output)),
    }


def _typed_results(prepared: PreparedRun, results: Any) -> tuple[Any, list[tuple[str, str]]]:
    """The results as one Arrow table with the schema's typed columns added (lists and structs as
    JSON text in CSV, which has no nested types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in results]) if isinstance(results, list) else results
    names = check_column_names(
        prepared.settings.column, prepared.typed_fields, prepared.columns.names, prepared.source.column_names
    )
    nested_as_json = output_format(prepared.settings.output) == "csv"
    return with_typed_columns(table, prepared.typed_fields, names, nested_as_json)


def already_done_report(prepared: PreparedRun) -> RunReport:
    m = prepared.done_marker or {}
    return RunReport(
        **prepared.report_identity(),
        rows=int(m.get("rows", 0)),
        rows_ok=int(m.get("rows_ok", 0)),
        rows_failed=int(m.get("rows_failed", 0)),
        prompt_tokens=0,
        prefill_tokens=0,
        completion_tokens=0,
        preemptions=0,
        elapsed_s=0.0,
        load_s=0.0,
        write_s=0.0,
        rows_resumed=int(m.get("rows", 0)),
        rows_rejected=int(m.get("rows_rejected", 0)),
        already_done=True,
        errors_file=m.get("errors_file"),
        rejects_file=m.get("rejects_file"),
        marker=str(marker_path(prepared.settings.output)),
    )
