"""What a user is told when something goes wrong: one line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix; printed as one line, exit code 2."""


def one_line(e: BaseException) -> str:
    """An exception as one line of a log or a report's failure table."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
