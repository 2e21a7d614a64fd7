"""What every command line of the project does with a failure it can name: one line on
standard error, ``error: <the problem, naming the file, key, shape or flag>``, and exit
status 2 (argparse's status for a bad flag), never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input, with the place it was found (file and line, record, field or flag) in its
    message. A ``ValueError``, so callers that catch those keep working."""


class CommandError(RuntimeError):
    """A failure that is not a bad input but that a command reports the same way (e.g. a
    training run whose loss stopped being finite)."""


# ValueError covers bad values, JSON and text decoding; OSError missing, existing or
# unreadable paths.
FAILURES = (ValueError, OSError, CommandError)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), for wrapping a
    library's multi-line failure into a one-line :class:`InputError`."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command's ``body``; its exit status (``None``: 0), or 2 after printing a
    failure of :data:`FAILURES` in one line."""
    try:
        status = body()
    except FAILURES as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if status is None else status


def positive_int(text: str) -> int:
    """argparse type of a count or size flag: an integer >= 1 (argparse names the flag in
    its error, exit status 2)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of an index, seed or id flag: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value
