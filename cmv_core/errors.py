"""The one error type every stage raises for an expected fault, and its exit codes.

The CLI catches :class:`CmvError` once and prints one line (``cmv <stage>: error: ...``)
on stderr, no traceback; ``exit_code`` says what kind of fault it was:
2 bad input or settings, 1 a failure that persisted after retries, 143 SIGTERM.
Stage modules subclass these (``class FormatInputError(InputError)``) instead of
catching and printing their own errors.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_SIGTERM = 143


class CmvError(Exception):
    """An expected fault: reported in one line, never with a traceback."""

    exit_code = EXIT_FAILURE


class InputError(CmvError, ValueError):
    """Bad input or settings (a file, a line, a manifest, a recipe key): exit 2."""

    exit_code = EXIT_BAD_INPUT


class IntegrityError(InputError):
    """An input file does not match the size/sha256 its upstream ``_SUCCESS`` lists."""


class StageFailed(CmvError, RuntimeError):
    """The stage could not finish (storage unreachable after retries, output not complete): exit 1."""

    exit_code = EXIT_FAILURE


class OutputError(StageFailed):
    """``finish_stage`` refused to write ``_SUCCESS``: the output is not exactly what this attempt wrote."""


class LeaseHeld(StageFailed):
    """Another live attempt holds the output's lease."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived; raised from the signal handler so ``finally`` blocks still run.

    A ``BaseException``, as ``KeyboardInterrupt`` is: a signal that lands while a library runs code under
    ``except Exception`` (logging's ``emit`` prints "--- Logging error ---" and carries on) must not be
    swallowed there. The CLI catches it beside :class:`CmvError` and prints the same one line."""

    exit_code = EXIT_SIGTERM
