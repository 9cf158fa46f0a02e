"""Exclusive run locks: flock() on a file, taken without waiting, dropped by the kernel when the holder
dies; and a probe of whether a live process holds one (`status`)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from batchllm_cli.durable import write_error
from batchllm_cli.errors import TempFailError, UsageError


class LockHeld(TempFailError):
    """Another process holds the lock (exit 75: try again later)."""


# `status` probes a lock by taking it for an instant (lock_is_held); a run that starts in that instant
# tries again for this long before it calls the lock held.
_LOCK_PATIENCE_S = 0.25


def _flock_briefly(fd: int) -> None:
    deadline = time.monotonic() + _LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


class FileLock:
    """An exclusive flock() on a file, taken without waiting.

    The kernel drops a flock when its holder dies, so the lock of a killed run is simply taken over.
    A holder may delete the lock file when it is done; a process that opened the old file just before
    notices (the path no longer names the file it locked) and retries with the new one.
    """

    def __init__(self, path: Path, *, remove_on_release: bool = False) -> None:
        self.path = path
        self.remove_on_release = remove_on_release
        self._fd: int | None = None
        self._touched = False  # we created the file or wrote to it (else a stale one stays as it was)

    def acquire(self, what: str) -> None:
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    # never through a symlink: the lock file is written (owner info) and removed
                    fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise UsageError(f"Cannot use {self.path} as a lock file ({exc.strerror or exc}); it must "
                                     "be a regular file batchllm made. Remove it and run again.") from exc
                created = False
            except OSError as exc:
                raise write_error(self.path, exc) from exc
            try:
                _flock_briefly(fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                owner = self._owner()
                raise LockHeld(
                    f"Another batchllm run{owner} is working on {what} (lock {self.path}); wait for it to "
                    "finish, or stop it and run this command again."
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: retry
                os.close(fd)
                continue
            self._fd = fd
            self._touched = created
            return
        raise LockHeld(f"Could not take the lock {self.path}; try again.")

    def record_owner(self) -> None:
        """Write our pid and host into the lock file (for the message another run prints)."""
        assert self._fd is not None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode() + b"\n", 0)
        self._touched = True

    def _owner(self) -> str:
        info = lock_owner(self.path)
        return f" (pid {info['pid']} on {info.get('host', '?')})" if info else ""

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove_on_release and self._touched:
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_is_held(path: Path) -> bool:
    """Whether a live process holds the flock on `path`: try to take it without waiting (and drop it at
    once). Opens the file read-only and never creates it; a missing file is a free lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def lock_owner(path: Path) -> dict[str, Any] | None:
    """The pid/host a run recorded in its lock file (information only: liveness is `lock_is_held`)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or isinstance(info.get("pid"), bool) or not isinstance(info.get("pid"), int):
        return None
    return info
