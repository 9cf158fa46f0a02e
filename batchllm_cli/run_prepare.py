"""Preparing a `run`: every check of the invocation, then the locks, the run directory and its manifest.

Everything that can be wrong with an invocation (input, template, output path, model directory,
settings, a checkpoint of a different job, another run holding the lock) is checked in `prepare_run`
before any model weights load. An output whose completion marker says it is this job's, finished and
intact, makes the run one that has nothing to do, unless it was written under another --column (not
part of the job): then its answers are read back and written again under the new names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from batchllm_cli.checkpoint import RunDir
from batchllm_cli.collector import OutputColumns
from batchllm_cli.column_names import check_column_names
from batchllm_cli.durable import make_dirs, remove_dirs, remove_durably
from batchllm_cli.engine_settings import check_engine_start, engine_config_of, sampling_params_of
from batchllm_cli.errors import BatchLLMError, FingerprintMismatch, UsageError
from batchllm_cli.file_lock import FileLock
from batchllm_cli.file_safety import check_run_paths, input_reads
from batchllm_cli.fingerprint import build_fingerprint, changed_fields, describe_changes, digest_of
from batchllm_cli.job_output import check_output_for_reuse, read_error_types, rejected_rows, seed_from_output
from batchllm_cli.job_types import PreparedRun, RunObserver, RunSettings, SilentObserver
from batchllm_cli.marker import MalformedMarker, Marker, read_marker
from batchllm_cli.model_setup import (
    check_model_files,
    check_room_for_prompt,
    load_tokenizer,
    model_context_length,
    note_tokens_past_vocabulary,
    resolve_chat,
    resolve_model,
)
from batchllm_cli.output_files import (
    default_run_dir,
    forget_run_dir,
    is_foreign_output,
    marker_path,
    output_lock_path,
    record_run_dir,
    remove_stale_output_files,
)
from batchllm_cli.prompt_options import check_prompt_columns, load_template
from batchllm_cli.prompts import TRUNCATE_SIDES
from batchllm_cli.structured_output import (
    ConstraintFlags,
    check_constraint_compiles,
    checked_typed_fields,
    resolve_constraint,
)
from batchllm_cli.table_io import TableSource, check_output_path
from batchllm_cli.templates import NULL_POLICIES


def _check_settings(settings: RunSettings) -> None:
    if settings.nulls not in NULL_POLICIES:
        raise UsageError(f"--nulls must be one of {', '.join(NULL_POLICIES)}.")
    if settings.truncate is not None and settings.truncate not in TRUNCATE_SIDES:
        raise UsageError(f"--truncate must be one of {', '.join(TRUNCATE_SIDES)}.")
    if settings.checkpoint_rows < 1:
        raise UsageError("--checkpoint-rows must be at least 1.")
    if settings.checkpoint_seconds <= 0:
        raise UsageError("--checkpoint-seconds must be positive.")
    if not settings.column:
        raise UsageError("--column must not be empty.")
    if settings.workers is not None or settings.ray_address is not None:
        from batchllm_cli.ray_run import check_scale_out

        check_scale_out(settings)


def _check_retry_flags(settings: RunSettings) -> None:
    if settings.restart and settings.retry_errors:
        raise UsageError("--restart and --retry-errors exclude each other: --restart runs every row again, "
                         "--retry-errors only the rows in error.")


def _finished_marker(
    settings: RunSettings, fingerprint: dict[str, Any], observer: RunObserver
) -> tuple[Marker | None, bool]:
    """(the marker if it is this job's and its output is intact, whether a marker file is present)."""
    try:
        marker = read_marker(settings.output)
    except MalformedMarker as exc:
        observer.notice(f"{exc}; it is ignored and replaced when this run finishes.")
        return None, True
    if marker is None:
        return None, False
    if marker.fingerprint_sha256 != digest_of(fingerprint):
        # Another job's finished output: this run replaces it (only once its own output is complete).
        old = marker.fingerprint
        changed = changed_fields(old, fingerprint) if old is not None else []
        what = f" (changed: {describe_changes(old, fingerprint, changed)})" if old is not None and changed else ""
        observer.notice(
            f"{settings.output} holds the finished output of a different job{what}; this run replaces it when "
            "it finishes."
        )
        return None, True
    if not marker.matches_output(settings.output):
        observer.notice(f"{settings.output} no longer matches its completion marker (missing or changed); "
                        "the job runs again.")
        return None, True
    return marker, True


def _written_columns(settings: RunSettings, marker: Marker, columns: OutputColumns) -> OutputColumns:
    """The answer columns a finished output of this job has. Markers written before they recorded
    --column name none: then the output itself must have this run's columns, since without the old
    name its answers cannot be read back to rewrite it (refused, exit 2, before anything is written)."""
    if marker.column is not None:
        return OutputColumns(marker.column)
    with TableSource(settings.output) as src:
        if all(name in src.column_names for name in columns.names):
            return columns
    raise UsageError(
        f"{settings.output} holds this job's finished answers under another --column, which its marker "
        f"{marker_path(settings.output).name} does not record; run with the --column it was written with, or "
        "add --restart to run every row again."
    )


def _check_foreign_output(settings: RunSettings, run_dir: RunDir) -> None:
    """A file at the output path that no batchllm job wrote (no completion marker, no checkpoint of
    a job writing it) is the user's: refused unless --overwrite."""
    output = settings.output
    if settings.overwrite or not is_foreign_output(output, run_dir.manifest_path.exists()):
        return
    raise UsageError(
        f"{output} already exists and no batchllm job wrote it (there is no {marker_path(output).name} beside "
        f"it and no checkpoint in {run_dir.path}): move it away, or add --overwrite to replace it once this "
        "run's output is complete."
    )


def prepare_run(settings: RunSettings, observer: RunObserver | None = None) -> PreparedRun:
    """Validate the whole invocation and take the locks; raises before any weights load:
    UsageError (exit 2), FingerprintMismatch (4), LockHeld (75). Nothing is written (run directory,
    manifest, marker removal) until every check has passed; only the lock files are taken before."""
    observer = observer or SilentObserver()
    _check_settings(settings)
    _check_retry_flags(settings)
    source = TableSource(
        settings.input, limit=settings.limit, skip_bad_rows=settings.skip_bad_rows, max_rejects=settings.max_rejects,
        options=settings.reading,
    )
    output_lock: FileLock | None = None
    run_dir: RunDir | None = None
    made_dirs: list[Path] = []
    try:
        # ---- checks (nothing is written) ----------------------------------------------------------
        check_output_path(settings.output, source.local_files)
        run_dir = RunDir(settings.checkpoint_dir or default_run_dir(settings.output))
        columns = OutputColumns(settings.column)
        check_column_names(source.file_column_names(), source.column_names, columns)
        template = load_template(settings.template, settings.nulls, settings.prompt)
        if not source.empty:  # a blank file has no columns to check (and no rows to render)
            check_prompt_columns(template, settings.prompt, source.column_names)
        constraint = resolve_constraint(
            ConstraintFlags(settings.choices, settings.regex, settings.json_schema),
            template.source.recipe,
            template.given_variables(source.column_names),
        )
        fields = checked_typed_fields(constraint, settings.column, columns.names, source.column_names)
        params = sampling_params_of(settings, template, constraint)
        model_dir, demo = resolve_model(settings.model, observer)
        check_model_files(model_dir, settings.device)
        context = model_context_length(model_dir)
        check_room_for_prompt(params.max_tokens, settings.max_tokens is not None, context)
        max_prompt_tokens = context - params.max_tokens
        check_run_paths(settings, run_dir.path, model_dir, input_reads(source.input))
        run_dir.check_owned()
        _check_foreign_output(settings, run_dir)
        fingerprint = build_fingerprint(
            input_id=source.identity(),
            input_files=source.snapshot_files(),
            reading=settings.reading.fingerprint(),
            limit=settings.limit,
            skip_bad_rows=settings.skip_bad_rows,
            id_column=settings.id_column,
            template_text=template.source.text,
            model_dir=model_dir,
            chat=settings.chat,  # as requested: the chat template itself is part of the model files
            sampling=dataclasses.asdict(params),
            nulls=settings.nulls,
            truncate=settings.truncate,
            dtype=settings.dtype,
            structured_output=constraint.fingerprint() if constraint is not None else None,
            prompt=settings.prompt.fingerprint(),
        )

        # Every check has passed: the output's directory may be made (the lock file lives there), and
        # is removed again if the run stops before writing anything else.
        made_dirs = make_dirs(settings.output.parent)
        output_lock = FileLock(output_lock_path(settings.output), remove_on_release=True)
        output_lock.acquire(str(settings.output))
        marker, marker_present = _finished_marker(settings, fingerprint, observer)
        # The finished output's answer columns (--restart keeps none): another --column rewrites it.
        written = _written_columns(settings, marker, columns) if marker is not None and not settings.restart else None
        reshape = written is not None and written != columns
        retry_finished = settings.retry_errors and marker is not None and marker.rows_failed > 0
        if marker is not None and not settings.restart and not retry_finished and not reshape:
            # Tidy what a run killed after its marker left (its lock file, temp files, run directory).
            output_lock.record_owner()
            remove_stale_output_files(settings.output)
            if not settings.keep_checkpoints:
                _remove_finished_run_dir(run_dir, marker, settings.output)
            return PreparedRun(
                settings, source, template, columns, model_dir, demo, None, bool(settings.chat), params, None,
                fingerprint=fingerprint, done_marker=marker, output_lock=output_lock,
                constraint=constraint, typed_fields=fields, made_dirs=made_dirs,
            )

        total_rows = source.validate()  # a malformed file fails here, naming the line
        if settings.id_column is not None:
            source.check_id_column(settings.id_column)

        manifest = None
        had_checkpoint = run_dir.manifest_path.exists()
        if had_checkpoint:
            run_dir.lock()
            manifest = run_dir.read_manifest() if not settings.restart else None
            if manifest is not None:
                changed = changed_fields(manifest["fingerprint"], fingerprint)
                if changed and not run_dir.has_shards():
                    # Nothing was committed (e.g. the last try failed as the model loaded): nothing to lose.
                    observer.notice(f"The checkpoint {run_dir.path} holds no finished rows; starting the new job.")
                    manifest = None
                elif changed and not (marker_present and _was_finished(settings.output, manifest)):
                    raise FingerprintMismatch(
                        f"The checkpoint {run_dir.path} belongs to a different job: changed "
                        f"{describe_changes(manifest['fingerprint'], fingerprint, changed)}. Run the original "
                        "command to finish it, or add --restart to discard it and start over."
                    )
                elif changed:
                    manifest = None  # a finished job kept with --keep-checkpoints: start a new one

        # Without the run directory the finished output gives its answers back (read before any write).
        reuse = written is not None and (retry_finished or reshape) and manifest is None
        error_types: dict[int, str] | None = None  # every row is kept: the rows in error with their types
        if reuse:
            assert marker is not None and written is not None
            why = "--retry-errors" if retry_finished else f"--column {settings.column}"
            if not retry_finished:
                error_types = read_error_types(settings.output, marker.rows_failed, why)
            check_output_for_reuse(settings.output, written, total_rows, why, error_types)
        tokenizer = load_tokenizer(model_dir)
        note_tokens_past_vocabulary(tokenizer, model_dir, observer)
        chat = resolve_chat(settings.chat, tokenizer, model_dir, settings.prompt.system)
        if constraint is not None:
            check_constraint_compiles(constraint, model_dir, tokenizer)
        engine_config = engine_config_of(settings, model_dir)
        check_engine_start(engine_config, settings)

        # ---- writes: every check has passed ------------------------------------------------------
        # The old marker goes first: its output is about to be replaced (the old output itself stays
        # until the new one is complete and renamed over it).
        output_lock.record_owner()
        remove_stale_output_files(settings.output)
        if marker_present:
            remove_durably([marker_path(settings.output)])
        if manifest is None:
            made = run_dir.ensure()
            dir_created = bool(made) or run_dir.created_by_batchllm()
            parents_made = made[:-1] if made else run_dir.parents_created()
            if not run_dir._lock.held:
                run_dir.lock()
            if settings.restart and had_checkpoint:
                observer.notice(f"--restart: discarding the checkpoint in {run_dir.path}.")
            elif settings.restart and marker is not None:
                observer.notice(f"--restart: running every row of the finished job again; {settings.output} "
                                "is replaced once the new output is complete.")
            run_dir.wipe()
            run_dir.create(
                fingerprint,
                {
                    "input": source.path,
                    "output": str(settings.output.resolve()),
                    "template_name": template.source.name,
                    "total_rows": total_rows,
                    "rows_rejected": rejected_rows(source),
                },
                dir_created=dir_created,
                parents_created=parents_made,
            )
        # With --checkpoint-dir, OUT.checkpoint.json says where the checkpoint is (`status OUT` reads it).
        record_run_dir(settings.output, run_dir.path)
        committed = run_dir.load_committed(total_rows)
        if committed.quarantined:
            observer.notice(
                f"Checkpoint: {len(committed.quarantined)} torn or uncommitted file(s) moved to "
                f"{run_dir.path / 'quarantine'}; their rows will run again."
            )
        if reshape:
            assert written is not None
            observer.notice(
                f"{settings.output} holds this job's finished answers as --column {written.prefix}; it is written "
                f"again as --column {settings.column}" + (" (the rows in error run again)." if retry_finished
                                                          else " without running any row.")
            )
        seeded = 0
        if reuse:
            assert written is not None
            seeded = seed_from_output(settings.output, written, run_dir, committed, error_types)
        if settings.retry_errors and manifest is None and not (retry_finished or reshape):
            # nothing of this job to keep (first run, or the input/template/model/settings changed)
            observer.notice("--retry-errors: there is no finished or checkpointed run of this job to retry, so "
                            "every row runs.")
        elif settings.retry_errors:
            # rows of a finished output left out of the seeded shards, then those in error in the run directory
            dropped = total_rows - seeded if retry_finished and reuse else 0
            dropped += run_dir.drop_error_rows(committed)
            observer.notice(f"--retry-errors: {dropped} row(s) in error will run again.")
        if committed.rows:
            observer.notice(
                f"Resuming from {run_dir.path}: {committed.rows} of {total_rows} rows already done "
                f"({len(committed.shards)} shards)."
            )
    except BaseException:
        if run_dir is not None:
            run_dir.unlock()
        if output_lock is not None:
            output_lock.release()
        remove_dirs(made_dirs)
        source.close()
        raise
    return PreparedRun(
        settings, source, template, columns, model_dir, demo, tokenizer, chat, params, engine_config,
        fingerprint=fingerprint, run_dir=run_dir, committed=committed, total_rows=total_rows,
        max_prompt_tokens=max_prompt_tokens, output_lock=output_lock,
        constraint=constraint, typed_fields=fields,
        earlier_model=dict(marker.model or {}) if written is not None and marker is not None else {},
        new_checkpoint=manifest is None, made_dirs=made_dirs,
    )


def _was_finished(output: Path, manifest: dict[str, Any]) -> bool:
    """The kept run directory belongs to the job whose marker sits beside the output."""
    try:
        marker = read_marker(output)
    except MalformedMarker:
        return False
    return marker is not None and marker.fingerprint_sha256 == digest_of(manifest["fingerprint"])


def _remove_finished_run_dir(run_dir: RunDir, marker: Marker, output: Path) -> None:
    """A run killed after its marker was written but before its cleanup leaves its run directory."""
    if not run_dir.manifest_path.is_file():
        _remove_manifestless_leftover(run_dir, output)
        return

    def remove_if_this_jobs() -> None:
        try:
            manifest = run_dir.read_manifest()
            if manifest is not None and digest_of(manifest["fingerprint"]) == marker.fingerprint_sha256:
                forget_run_dir(output)
                run_dir.remove()
        except BatchLLMError:
            pass

    _while_locked(run_dir, remove_if_this_jobs)


def _remove_manifestless_leftover(run_dir: RunDir, output: Path) -> None:
    """A run killed inside its cleanup, after the manifest (removed last) went, leaves the directory.
    With the finished job's marker in place no run has started another checkpoint there (a new run
    removes the marker before it writes a manifest), so what is left is the finished job's: removed, and
    the directory too when it is OUT.batchllm/ (batchllm's by its name; a --checkpoint-dir may have been
    there before the run, and without the manifest nothing says whether a run created it)."""
    if not run_dir.path.is_dir() or run_dir.path.is_symlink() or run_dir.foreign_entries():
        return

    def remove_leftover() -> None:
        if not run_dir.manifest_path.exists():  # looked at again under the lock
            run_dir.remove_leftover(remove_dir=run_dir.path == default_run_dir(output))

    _while_locked(run_dir, remove_leftover)


def _while_locked(run_dir: RunDir, action: Callable[[], None]) -> None:
    """`action` under the run directory's lock; nothing when another run holds it (that run owns the
    directory now)."""
    try:
        run_dir.lock()
    except BatchLLMError:
        return
    try:
        action()
    finally:
        run_dir.unlock()


def discard_new_checkpoint(prepared: PreparedRun) -> None:
    """Remove the run directory this run created, with its lock, when nothing was committed to it: a
    run the engine refused to start (a usage error) then leaves nothing behind, as a run refused
    earlier does, and `status` says the job has not started rather than offering a resume the same
    command cannot make. An earlier run's checkpoint, or one holding rows, is kept."""
    run_dir = prepared.run_dir
    if run_dir is None or not prepared.new_checkpoint or run_dir.has_shards():
        return
    forget_run_dir(prepared.settings.output)  # OUT.checkpoint.json first: it never names a directory that is gone
    run_dir.remove()
    run_dir.unlock()
    prepared.run_dir = None
