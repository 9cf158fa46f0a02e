"""Leaving the process without the interpreter's teardown.

After a run has loaded torch, Python's own shutdown (freeing every module's objects) takes 0.3-1 s
of wall time on a shared CPU: a third of a one-row job. Everything the CLI writes is closed and
synced before its command returns, so the teardown frees memory the OS reclaims anyway. What a
normal exit does first is done here too: non-daemon threads are waited for (if any is alive the
normal exit is taken instead), atexit handlers run (temporary directories, weakref finalizers,
logging), and stdout/stderr are flushed (text a reader that left did not take is dropped: the exit
code stays the command's, see std_streams.py). Under a profiler or tracer (cProfile, coverage, a
debugger), which writes its results after the program returns, the normal exit is taken.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Exit with `code` at once (see the module docstring); the normal exit where that is not safe."""
    # The command has ended (its rows committed, its code decided): a Ctrl-C pressed again meanwhile
    # must not turn the teardown's atexit handlers into a KeyboardInterrupt traceback.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # runs each handler once and clears them
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the descriptor was closed at start (std_streams.py)
                stream.flush()
        except BrokenPipeError:  # its reader is gone: what it did not take is dropped, the code stays
            pass
        except (OSError, ValueError):  # a write error (a full disk): let the normal exit report it as it would
            sys.exit(code)
    os._exit(code)
