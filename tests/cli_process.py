"""Run `batchllm` in real, separate, killable processes without paying the import cost each time.

A process that imports torch, transformers and the CLI takes 5-15 s to start on the shared test
machines, so a crash test that kills and restarts the CLI dozens of times would take many minutes.
This module uses multiprocessing's *forkserver*: one clean server process imports everything once
(it runs nothing else, so it holds no threads or locks), and every CLI run is a fresh fork of it that
calls the real console entry point (`batchllm_cli.app.main`) with its own argv and environment. Each
run is a real process with its own pid: SIGKILL, SIGTERM and `os._exit` crash points behave exactly as
for `batchllm` started from a shell. (tests/test_crash.py also starts `python -m batchllm_cli` itself
to check that the entry point behaves the same.)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported here so that the forkserver, which preloads this module, has them all in memory.
import batchllm_cli.app  # noqa: F401
import engine.llm_engine  # noqa: F401
import engine.tokenizer  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
from transformers.models.auto import tokenization_auto  # noqa: F401
from transformers.models.llama import configuration_llama  # noqa: F401  # pulls torch._dynamo etc.: ~4 s

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["cli_process"])
        # The server must find this module and the repo; Python 3.11's forkserver ignores the parent's
        # sys.path (and silently skips a preload it cannot import), so hand it over as PYTHONPATH.
        here = Path(__file__).resolve().parent
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent)] + ([old] if old else []))
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        _CTX = ctx
    return _CTX


def _child(args: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    for key in [k for k, v in env.items() if v is None]:
        os.environ.pop(key, None)
    sys.argv = ["batchllm", *args]
    code = 0
    try:
        from batchllm_cli.app import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an uncaught exception would
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class CliProcess:
    proc: Any
    log: Path
    started: float

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def wait(self, timeout: float = 600.0) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            raise TimeoutError(f"batchllm did not exit within {timeout} s; log:\n{self.output}")
        code = self.proc.exitcode
        return code if code >= 0 else 128 - code  # killed by signal N -> 128 + N, as a shell reports

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def running(self) -> bool:
        return self.proc.exitcode is None and self.proc.is_alive()

    @property
    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> CliProcess:
    """Start `batchllm ARGS` in a new process (forked from the preloaded server)."""
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"batchllm-{os.getpid()}-{time.monotonic_ns()}.log"
    proc = _context().Process(target=_child, args=(list(args), dict(env or {}), str(log)), daemon=True)
    proc.start()
    return CliProcess(proc, log, time.monotonic())


def run(args: list[str], env: dict[str, str] | None = None, log: Path | None = None,
        timeout: float = 600.0) -> tuple[int, str]:
    """Run `batchllm ARGS` to the end in a new process: (exit code, stdout+stderr)."""
    p = start(args, env, log)
    code = p.wait(timeout)
    return code, p.output
