"""Errors the CLI knows how to report: one line on stderr and a documented exit code."""
from __future__ import annotations

# Exit codes are part of the CLI contract (scripts, cron and Airflow branch on them).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3


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
    """The output could not be written after the run (disk full, permissions changed): fatal."""

    exit_code = EXIT_INTERNAL
