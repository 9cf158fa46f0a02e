"""Plain names for the files DuckDB opens, so a user's path is always one literal file.

DuckDB treats a file name as a pattern: `*`, `?`, `[...]` and `{a,b}` glob (a decoy `g1.csv` is read for
`g[1].csv`; `o*.csv` reads every matching file), a leading `~` is the home directory, and `s3://`-like
prefixes pick a file system. Escaping is not offered. So DuckDB never sees a user's path: each file it
reads or writes is reached through a symlink with a plain name (`[A-Za-z0-9_.-]`) in a private directory
(`tempfile.mkdtemp`, mode 0700), and the kernel, not DuckDB, resolves the user's path. The links are
removed, by name, when the owner closes (or is collected, or the process exits); after a `kill -9` a
`batchllm-*` directory holding only symlinks (no data) may stay behind in the temp directory.
"""
from __future__ import annotations

import os
import re
import tempfile
import weakref
from pathlib import Path
from types import TracebackType

from batchllm_cli.errors import UsageError

# What a path may contain for DuckDB to take it literally: absolute, no pattern or prefix characters.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./-]*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_plain(path: str) -> bool:
    return _PLAIN_PATH.fullmatch(path) is not None and "/~" not in path


def _private_dir() -> Path:
    """A new 0700 directory whose own path is plain: under $TMPDIR, else under /tmp."""
    for base in (None, "/tmp"):
        try:
            made = tempfile.mkdtemp(prefix="batchllm-", dir=base)
        except OSError:
            continue
        if is_plain(made):
            return Path(made)
        os.rmdir(made)
    raise UsageError(
        f"Cannot make a private temporary directory: {tempfile.gettempdir()} is not writable or has "
        "characters DuckDB would read as a pattern, and /tmp is not usable; set TMPDIR to a writable "
        "directory whose path has only letters, digits, '_', '.', '-' and '/'."
    )


def _remove(directory: Path | None, links: list[Path]) -> None:
    for link in links:
        try:
            link.unlink()
        except OSError:
            pass
    links.clear()
    if directory is not None:
        try:
            directory.rmdir()
        except OSError:
            pass


class PlainPaths:
    """Symlinks with plain names to a user's files, for as long as this object is open."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._links: list[Path] = []
        self._finalizer: weakref.finalize | None = None

    def link(self, target: str | os.PathLike[str], name: str) -> str:
        """A plain absolute path that opens `target` (taken literally, relative to the cwd now)."""
        assert _PLAIN_NAME.fullmatch(name), name
        if self._dir is None:
            self._dir = _private_dir()
            self._finalizer = weakref.finalize(self, _remove, self._dir, self._links)
        link = self._dir / name
        # absolute() does not fold `..` (the kernel resolves it after any symlinked directory).
        os.symlink(Path(target).absolute(), link)
        self._links.append(link)
        assert is_plain(str(link)), link
        return str(link)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> PlainPaths:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
