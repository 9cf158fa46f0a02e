"""Where a report goes (`run --summary`, `analyze --json/--html`): `-` is stdout, a regular file is
replaced whole (a reader never sees half a report), and a stream is written in place.

A stream is a path that is not a regular file (a device such as /dev/null, a FIFO, the /dev/fd/N of a
shell's `>(...)`) or any path under /dev or /proc (/dev/stdout may lead to the shell's `> log.txt`).
Replacing one with a renamed temporary file would destroy it (as root, /dev/null itself), so it is
opened and appended to: appending keeps what a redirected stdout already holds. A symbolic link to a
regular file is written through: its target is replaced, the link stays.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from batchllm_cli.durable import atomic_write_bytes
from batchllm_cli.errors import UsageError
from batchllm_cli.std_streams import stdout_data

_STREAM_ROOTS = ("/dev/", "/proc/")


def is_stream(path: Path) -> bool:
    if str(path.absolute()).startswith(_STREAM_ROOTS):
        return True
    try:
        mode = path.stat().st_mode
    except OSError:  # missing (or a dangling link): a file to create
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_report_target(path: str | None, flag: str) -> None:
    """UsageError unless the report `path` can be written; checked before any work is done."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag}: {p} is a directory; give a file name.")
    if is_stream(p):
        if p.exists() and not os.access(p, os.W_OK):
            raise UsageError(f"{flag}: cannot write {p} (permission denied).")
        return
    parent = Path(os.path.realpath(p)).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag}: cannot write {p} (no writable directory {parent}).")


def write_report(path: str, text: str) -> None:
    """`text` to the report `path` (see the module's docstring). Raises OSError."""
    if path == "-":
        with stdout_data():  # a reader that left (`| true`, `| head`) does not fail the command
            sys.stdout.write(text)
            sys.stdout.flush()
        return
    p = Path(path)
    if is_stream(p):
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
        return
    atomic_write_bytes(Path(os.path.realpath(p)), text.encode("utf-8"))
