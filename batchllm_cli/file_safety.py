"""One check, made before anything is written, that no path batchllm writes is (or resolves to, through a
symlink or a hard link) a file it reads, or another path it writes.

A write target is compared with every read file and every other write target by resolved path and, when
both exist, by inode (os.path.samefile). A directory target (the run directory) must not contain any other
path of the job, and a file target must not be named like the temporary files batchllm cleans up beside it.
Nothing written may land inside a directory input or match an --input-glob pattern: the next run of the
same command would read it as one of its input files.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from batchllm_cli.output_files import errors_path, marker_path, output_lock_path, rejects_path, run_dir_pointer_path
from batchllm_cli.durable import check_writable_dir, is_temp_of
from batchllm_cli.errors import UsageError

if TYPE_CHECKING:
    from batchllm_cli.prompt_options import PromptOptions
    from batchllm_cli.job_types import RunSettings
    from batchllm_cli.table_io.inputs import ResolvedInput


@dataclass(frozen=True)
class JobPath:
    what: str  # how the user knows it: "the input file", "--summary", ...
    path: Path
    is_dir: bool = False  # a directory batchllm owns whole (nothing else of the job may live inside)
    input_dir: bool = False  # a directory input: nothing written may land inside it
    pattern: bool = False  # an --input-glob pattern (absolute): nothing written may match it


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _inside(p: Path, directory: Path) -> bool:
    return p.resolve().is_relative_to(directory.resolve())


_READ_AGAIN = ", so the next run would read it as input"


def _clash(w: JobPath, other: JobPath) -> str | None:
    if other.pattern:
        if fnmatch.fnmatchcase(str(w.path.absolute()), str(other.path)):
            return f"{w.what} {w.path} matches {other.what} {other.path}{_READ_AGAIN}"
        return None
    if other.input_dir and _inside(w.path, other.path):
        return f"{w.what} {w.path} is inside {other.what} {other.path}{_READ_AGAIN}"
    if _same(w.path, other.path):
        return f"{w.what} {w.path} is {other.what} {other.path}"
    if w.is_dir and _inside(other.path, w.path):
        return f"{other.what} {other.path} is inside {w.what} {w.path}"
    if not other.is_dir and is_temp_of(other.path, w.path) and other.path.parent.resolve() == w.path.parent.resolve():
        return f"{other.what} {other.path} is named like a temporary file of {w.what} {w.path}"
    return None


def check_job_paths(reads: Iterable[JobPath], writes: Sequence[JobPath]) -> None:
    """UsageError (exit 2) naming both paths when a written path would overwrite, delete or contain a
    read file or another written path."""
    reads = list(reads)
    for w in writes:
        if not w.is_dir and w.path.is_dir():
            raise UsageError(f"{w.what} {w.path} is a directory; batchllm writes a file there. Move the "
                             "directory or choose another path.")
    for i, w in enumerate(writes):
        for other in reads + [x for j, x in enumerate(writes) if j != i]:
            clash = _clash(w, other)
            if clash and clash.endswith(_READ_AGAIN):
                raise UsageError(f"{clash}; write it outside the input.")
            if clash:
                raise UsageError(f"{clash}; batchllm would overwrite it. Give each path a name of its own.")


def model_files(model_dir: Path) -> list[JobPath]:
    """The files of a model directory (and of its direct subdirectories) as read paths."""
    out: list[JobPath] = []
    try:
        for entry in os.scandir(model_dir):
            if entry.is_file():
                out.append(JobPath("the model file", Path(entry.path)))
            elif entry.is_dir():
                out += [JobPath("the model file", Path(e.path)) for e in os.scandir(entry.path) if e.is_file()]
    except OSError:
        pass
    return out


def input_reads(inp: ResolvedInput) -> list[JobPath]:
    """The input as read paths: its local files, its directories (nothing written may land inside one:
    a later run would read it as an input file) and its --input-glob patterns (nothing written may
    match one). stdin and URLs have none."""
    reads = [JobPath("the input file", f.path) for f in inp.files if not f.is_url and not inp.stdin]
    reads += [JobPath("the input directory", d, input_dir=True) for d in inp.directories]
    reads += [JobPath("the --input-glob pattern", Path(p), pattern=True) for p in inp.patterns]
    return reads


class ReadsFiles(Protocol):
    """The settings of run, analyze and render that name files the command reads."""

    @property
    def template(self) -> str: ...
    @property
    def json_schema(self) -> Path | None: ...
    @property
    def choices(self) -> str | None: ...
    @property
    def prompt(self) -> PromptOptions: ...


def files_read(settings: ReadsFiles, model_dirs: Iterable[Path | None]) -> list[JobPath]:
    """Every file a command reads besides its input: the template, the files of its model and tokenizer
    directories, --json-schema, --choices @FILE and --system @FILE. The one list run and analyze check
    their written paths against, so a flag that reads a file cannot be forgotten by one of them."""
    reads: list[JobPath] = []
    if Path(settings.template).is_file():  # else a bundled recipe
        reads.append(JobPath("the template", Path(settings.template)))
    for directory in model_dirs:
        if directory is not None:
            reads += model_files(directory)
    if settings.json_schema is not None:
        reads.append(JobPath("--json-schema", Path(settings.json_schema)))
    if settings.choices is not None and settings.choices.startswith("@"):
        reads.append(JobPath("--choices", Path(settings.choices[1:])))
    if settings.prompt.system_file is not None:
        reads.append(JobPath("--system", settings.prompt.system_file))
    return reads


def check_run_paths(settings: RunSettings, run_dir: Path, model_dir: Path, inputs: list[JobPath]) -> None:
    """`run`'s paths: nothing the job writes may be, or resolve to, a file it reads or another file it
    writes, or land where a directory or pattern input would read it; the run directory's parent must be
    writable."""
    out = settings.output
    reads = list(inputs) + files_read(settings, [model_dir])
    run_dir_name = "--checkpoint-dir" if settings.checkpoint_dir is not None else "the checkpoint directory"
    writes = [
        JobPath("--output", out),
        JobPath(run_dir_name, run_dir, is_dir=True),
        JobPath("the errors file", errors_path(out)),
        JobPath("the rejects file", rejects_path(out)),
        JobPath("the completion marker", marker_path(out)),
        JobPath("the output lock", output_lock_path(out)),
        JobPath("the checkpoint pointer", run_dir_pointer_path(out)),
    ]
    if settings.summary is not None:
        writes.append(JobPath("--summary", settings.summary))
    check_job_paths(reads, writes)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir_name} {run_dir} exists and is not a directory.")
    check_writable_dir(run_dir.parent if str(run_dir.parent) else Path("."), "Checkpoint location")
