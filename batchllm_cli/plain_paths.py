"""Plain names for the files DuckDB opens, so a user's path is always one literal file.

DuckDB treats a file name as a pattern: `*`, `?`, `[...]` and `{a,b}` glob (a decoy `g1.csv` is read for
`g[1].csv`; `o*.csv` reads every matching file), a leading `~` is the home directory, and `s3://`-like
prefixes pick a file system. Escaping is not offered. So DuckDB never sees a user's path: each file it
reads or writes is reached through a symlink with a plain name (`[A-Za-z0-9_.-]`) in a private directory
(`tempfile.mkdtemp`, mode 0700), and the kernel, not DuckDB, resolves the user's path. The links are
removed, by name, when the owner closes (or is collected, or the process exits).

Every temporary directory a batchllm process makes is one of these private directories (`private_dir`):
the links, DuckDB's spill files (`PlainPaths.spill_dir`), a spooled stdin or transcoded input, and the
plan's token spool and out-of-core sort (planned_feed, ray_run, analyze). They are named
`batchllm-<pid namespace>-<pid>-*`, so one left behind by a `kill -9`, an OOM kill or a SIGHUP is removed
by the next batchllm process that makes one in the same temp directory and pid namespace once its owner
is gone (`remove_stale_dirs`); a directory whose owner still runs, or of another user, is never touched.

A write there that does not fit (disk full, quota, `ulimit -f`) stops the run as a temporary failure
naming the temp directory (`temp_full_error`, `temp_writes`), not as a fault of the output or input.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator

from batchllm_cli.durable import disk_full_reason, full_disk_fix
from batchllm_cli.errors import BatchLLMError, TempFailError, UsageError

# What a path may contain for DuckDB to take it literally: absolute, no pattern or prefix characters.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./-]*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SPILL_NAME = "duckdb-spill"


def is_plain(path: str) -> bool:
    return _PLAIN_PATH.fullmatch(path) is not None and "/~" not in path


def _pid_namespace() -> str:
    """This process's pid namespace (a pid means one process only within it; '0' if unknown)."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


_OWNED_DIR = re.compile(r"batchllm-(\d+)-(\d+)-[A-Za-z0-9_]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_dirs(base: str) -> list[Path]:
    """Remove private directories under `base` left by batchllm processes of this pid namespace and
    this user that no longer run (killed with -9); the ones removed."""
    ns, removed = _pid_namespace(), []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        m = _OWNED_DIR.fullmatch(entry.name)
        if not m or m.group(1) != ns or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # symlinks are removed, never followed
        removed.append(Path(entry.path))
    return removed


@functools.lru_cache(maxsize=None)
def _cleaned(base: str) -> None:
    remove_stale_dirs(base)


_bases: list[str] = []  # the temp directories this process made private directories in


def _owned_dir(base: str | None) -> Path:
    """A new 0700 directory under `base` (None: $TMPDIR) named for remove_stale_dirs; the first one
    made in a temp directory sweeps what dead runs left there (once per process: cheap)."""
    made = Path(tempfile.mkdtemp(prefix=f"batchllm-{_pid_namespace()}-{os.getpid()}-", dir=base))
    _cleaned(str(made.parent))
    if str(made.parent) not in _bases:
        _bases.append(str(made.parent))
    return made


def private_dir(base: Path | None = None) -> Path:
    """A new private temporary directory of this process, removed by its owner when done (or, after a
    kill, by the next run): under `base` when given, else one whose own path is plain (DuckDB reads
    paths in it) under $TMPDIR, else under /tmp."""
    if base is not None:
        return _owned_dir(str(base))
    for candidate in (None, "/tmp"):
        try:
            made = _owned_dir(candidate)
        except OSError:
            continue
        if is_plain(str(made)):
            return made
        os.rmdir(made)
    raise UsageError(
        f"Cannot make a private temporary directory: {tempfile.gettempdir()} is not writable or has "
        "characters DuckDB would read as a pattern, and /tmp is not usable; set TMPDIR to a writable "
        "directory whose path has only letters, digits, '_', '.', '-' and '/'."
    )


# DuckDB's spill files, in a private directory's `duckdb-spill-N` (its message quotes the file's path;
# an output or input is reached through a link beside them, never inside one).
_SPILL_FILE = re.compile(r"(/[^\s\"']*)/batchllm-\d+-\d+-[A-Za-z0-9_]+/" + SPILL_NAME + r"-\d+/")
# DuckDB checks the room left before it spills, and says so as an "Out of Memory Error" (without a path:
# only our connections spill, into their private directory).
_NO_ROOM_TO_SPILL = "failed to offload data block"


def temp_full_error(exc: BaseException, private: Path | None = None, setting: str = "TMPDIR") -> TempFailError | None:
    """The error that stops a run when `exc` is a write into a private temporary directory that did not
    fit: disk full, quota or file size limit in `private` (the directory the caller wrote into), or in
    DuckDB's spill files (known by their path, or by DuckDB finding no room for them); else None.
    The message names the temp directory holding it and `setting`, which moves it."""
    if isinstance(exc, BatchLLMError):
        return None
    text = str(exc)
    reason = disk_full_reason(exc)
    spill = _SPILL_FILE.search(text)
    if _NO_ROOM_TO_SPILL in text.lower():
        reason = "no room left for DuckDB's spill files"
    elif reason is None or (private is None and spill is None):
        return None
    if private is not None:
        base = str(private.parent)
    elif spill is not None:
        base = spill.group(1)
    else:
        base = _bases[-1] if _bases else tempfile.gettempdir()
    return TempFailError(
        f"Cannot write to the temporary directory {base}: {reason}; {full_disk_fix(reason)} or set {setting} "
        "to a directory with more room, then run the same command again (a run resumes from its committed rows)."
    )


@contextmanager
def temp_writes(private: Path, setting: str = "TMPDIR") -> Iterator[None]:
    """Writes into the private directory `private` in this block: one that does not fit raises
    temp_full_error's TempFailError (exit 75) instead of a traceback."""
    try:
        yield
    except Exception as exc:
        error = temp_full_error(exc, private, setting)
        if error is None:
            raise
        raise error from exc


def _remove(directory: Path | None, links: list[Path]) -> None:
    for link in links:
        try:
            link.unlink()
        except OSError:
            pass
    links.clear()
    if directory is not None:
        for spill in directory.glob(SPILL_NAME + "-*"):  # DuckDB's, if it did not remove them
            shutil.rmtree(spill, ignore_errors=True)
        try:
            directory.rmdir()
        except OSError:
            pass


class PlainPaths:
    """Symlinks with plain names to a user's files, for as long as this object is open."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._links: list[Path] = []
        self._spills = 0
        self._finalizer: weakref.finalize | None = None

    def link(self, target: str | os.PathLike[str], name: str) -> str:
        """A plain absolute path that opens `target` (taken literally, relative to the cwd now)."""
        assert _PLAIN_NAME.fullmatch(name), name
        self._ensure_dir()
        assert self._dir is not None
        link = self._dir / name
        # absolute() does not fold `..` (the kernel resolves it after any symlinked directory).
        os.symlink(Path(target).absolute(), link)
        self._links.append(link)
        assert is_plain(str(link)), link
        return str(link)

    def private_file(self, name: str) -> Path:
        """A path in this private directory for a file of ours (a spooled stdin, a transcoded input),
        removed on close like the links; the caller creates it."""
        assert _PLAIN_NAME.fullmatch(name), name
        self._ensure_dir()
        assert self._dir is not None
        path = self._dir / name
        self._links.append(path)
        return path

    def directory(self) -> Path:
        """This object's private directory (made now if need be), for files written with private_file."""
        self._ensure_dir()
        assert self._dir is not None
        return self._dir

    def spill_dir(self) -> str:
        """A plain path in this private directory for DuckDB's spill files (its default is `.tmp` in the
        user's current directory); DuckDB makes it when it first spills and removes it on close."""
        self._ensure_dir()
        assert self._dir is not None
        self._spills += 1  # one per connection: two databases never share spill files
        return str(self._dir / f"{SPILL_NAME}-{self._spills}")

    def _ensure_dir(self) -> None:
        if self._dir is None:
            self._dir = private_dir()
            self._finalizer = weakref.finalize(self, _remove, self._dir, self._links)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> PlainPaths:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

