"""Errors the CLI knows how to report: one line on stderr and a documented exit code."""
from __future__ import annotations

# Exit codes are part of the CLI contract (scripts, cron and Airflow branch on them).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3
EXIT_FINGERPRINT = 4  # the run directory holds a different job (changed input, template, model, ...)
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: out of GPU memory, disk full, another run holds the lock; retry later
EXIT_SIGHUP = 129  # 128 + SIGHUP (the terminal or ssh connection went away): as for SIGINT
EXIT_SIGINT = 130  # 128 + SIGINT: interrupted; committed rows are kept, the same command resumes
EXIT_SIGTERM = 143  # 128 + SIGTERM: terminated; committed rows are kept, the same command resumes

# `batchllm status` (a sensor branches on these): 0 finished, 3 finished with errors, as for `run`.
EXIT_STATUS_RUNNING = 10
EXIT_STATUS_INTERRUPTED = 11
EXIT_STATUS_NOT_STARTED = 12

STATUS_EXIT_CODES_HELP = (
    "Exit codes: 0 finished, every row ok; 3 finished, but some rows are in error or some CSV records were "
    "rejected; 10 running (a process holds the output's lock); 11 interrupted: a checkpoint is there and "
    "nobody works on it, the same run command resumes; 12 not started (no checkpoint, no valid "
    "output); 1 fatal error; 2 usage error (the target is neither an output nor a run directory, or is a "
    "file no batchllm job wrote)."
)

EXIT_CODES_HELP = (
    "Exit codes: 0 all rows done (or the job had already finished); 1 fatal error; 2 usage error "
    "(bad flag, missing or malformed input, unknown template variable, unusable model or output; found "
    "before the model loads); 3 finished, but some rows are in error (see the *_error column and "
    "OUTPUT.errors.jsonl) or some CSV records were rejected (OUTPUT.rejects.jsonl); 4 the checkpoint "
    "holds a different job (input, template, model or settings changed: use --restart to discard it; "
    "or the input changed while the job ran: no output was written); 75 temporary failure (GPU out of "
    "memory, disk full, another run holds the lock): the same command again may succeed and resumes; "
    "129/130/143 interrupted by "
    "SIGHUP/SIGINT/SIGTERM after saving finished rows: the same command resumes."
)


class BatchLLMError(Exception):
    """A problem the user can fix; the message is one sentence that says what to do."""

    exit_code: int = EXIT_INTERNAL


class UsageError(BatchLLMError):
    """Bad invocation: missing input, unknown template variable, unusable model or output path.

    Raised before any model weights load, so a bad command fails in seconds.
    """

    exit_code = EXIT_USAGE


class InputError(BatchLLMError):
    """The input table could not be read (bad file, unreadable value while streaming)."""

    exit_code = EXIT_USAGE


class OutputError(BatchLLMError):
    """The output could not be written after the run (permissions changed, I/O error): fatal."""

    exit_code = EXIT_INTERNAL


class FingerprintMismatch(BatchLLMError):
    """The run directory belongs to a different job; nothing was changed on disk."""

    exit_code = EXIT_FINGERPRINT


class InputChanged(FingerprintMismatch):
    """The input changed while the job ran: no output was written, the checkpoint is kept (exit 4)."""


class TempFailError(BatchLLMError):
    """A failure that running the same command again may fix (committed rows are kept)."""

    exit_code = EXIT_TEMPFAIL


class Interrupted(BatchLLMError):
    """SIGHUP/SIGINT/SIGTERM arrived: finished rows were committed, the same command resumes."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
