"""The files a run keeps beside its output, by name.

Beside the output: `OUTPUT.lock` (held while a run works on the output; holds pid and host),
`OUTPUT.success.json` (the completion marker, written last: counts, output size and sha256, and the
fingerprint), `OUTPUT.errors.jsonl` (rows in error), `OUTPUT.rejects.jsonl` (rejected CSV lines) and,
with `--checkpoint-dir`, `OUTPUT.checkpoint.json`: where the run directory is, so that `status OUTPUT`
finds it (written once the manifest exists, removed just before the run directory is).
"""
from __future__ import annotations

from pathlib import Path

from batchllm_cli.durable import atomic_write_bytes, is_temp_of, json_bytes, read_json, remove_durably, write_error


def _beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


def default_run_dir(output: Path) -> Path:
    return _beside(output, ".batchllm")


def marker_path(output: Path) -> Path:
    return _beside(output, ".success.json")


def errors_path(output: Path) -> Path:
    return _beside(output, ".errors.jsonl")


def rejects_path(output: Path) -> Path:
    return _beside(output, ".rejects.jsonl")


def output_lock_path(output: Path) -> Path:
    return _beside(output, ".lock")


def run_dir_pointer_path(output: Path) -> Path:
    return _beside(output, ".checkpoint.json")


def is_foreign_output(output: Path, has_checkpoint: bool) -> bool:
    """Whether a file at `output` is the user's, not a batchllm job's: no completion marker beside it
    and no checkpoint of a job writing it (`run` refuses to replace it without --overwrite)."""
    return output.exists() and not marker_path(output).exists() and not has_checkpoint


def record_run_dir(output: Path, run_dir: Path) -> None:
    """Name a --checkpoint-dir beside the output (OUTPUT.checkpoint.json), for `status OUTPUT`; with the
    default run directory, remove one an earlier run left (the job's checkpoint is no longer there)."""
    pointer = run_dir_pointer_path(output)
    if run_dir.resolve() == default_run_dir(output).resolve():
        forget_run_dir(output)
        return
    data = {"run_dir": str(run_dir.resolve()), "output": str(output.resolve())}
    try:
        atomic_write_bytes(pointer, json_bytes(data))
    except OSError as exc:
        raise write_error(pointer, exc) from exc


def forget_run_dir(output: Path) -> None:
    """Remove OUTPUT.checkpoint.json (before the run directory it names is removed)."""
    try:
        remove_durably([run_dir_pointer_path(output)])
    except OSError as exc:
        raise write_error(run_dir_pointer_path(output), exc) from exc


def recorded_run_dir(output: Path) -> tuple[Path | None, str | None]:
    """(the run directory OUTPUT.checkpoint.json names, or None; a problem line when it cannot be read)."""
    pointer = run_dir_pointer_path(output)
    data = read_json(pointer)
    if data is None:
        return None, None
    run_dir = data.get("run_dir") if isinstance(data, dict) else None
    if not isinstance(run_dir, str) or not run_dir:
        return None, (f"{pointer} cannot be read, so a --checkpoint-dir cannot be found; run the same "
                      "`batchllm run` command again to rewrite it.")
    return Path(run_dir), None


def remove_stale_output_files(output: Path) -> None:
    """Temporary files a killed run left beside the output (never renamed, so never visible)."""
    parent = output.parent if str(output.parent) else Path(".")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        if is_temp_of(p, output):
            try:
                p.unlink()
            except OSError:
                pass
